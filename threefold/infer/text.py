"""Text in and out of a checkpoint's model: which tokenizer, the prompts' token ids, the stop token.

The tokenizer is the one named (a tokenizer.json path, or 'gpt2'), else the one that travels with the
checkpoint (data.tokenizer.find_tokenizer), else the one the checkpoint's training data was prepared
with (its meta.json); with none of them it is an error. Beside a checkpoint's tokenizer.json,
tokenizer_config.json may name the end-of-text token and hold the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from threefold.data.tokenizer import EOS_CANDIDATES, GPT2_NAME, find_tokenizer, load_tokenizer


@dataclass
class TextCodec:
    """A tokenizer and its settings (tokenizer_config.json's, when it has one)."""

    tokenizer: Tokenizer
    settings: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None

    def eos_id(self) -> int | None:
        """The token that ends a generation: tokenizer_config.json's eos_token, else a usual one."""
        for token in (_token_text(self.settings.get("eos_token")), *EOS_CANDIDATES):
            if token is not None and (token_id := self.tokenizer.token_to_id(token)) is not None:
                return int(token_id)
        return None

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        """A prompt's ids; with `chat`, the prompt as a user turn of the chat template first (which writes
        its own special tokens, so the tokenizer adds none)."""
        if not chat:
            return list(self.tokenizer.encode(prompt).ids)
        if self.chat_template is None:
            raise ValueError("--chat needs a chat template, but the tokenizer's config has none")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # A template comes with the checkpoint, so it is untrusted: the sandbox keeps it to rendering.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ValueError(f"the chat template refused the prompt: {message}")

        env.globals["raise_exception"] = raise_exception
        special = {k: _token_text(self.settings.get(k)) or "" for k in ("bos_token", "eos_token")}
        text = env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, **special
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def load_codec(checkpoint: Path, named: str | None, config: dict[str, Any]) -> TextCodec:
    """The tokenizer for a checkpoint: `named`, else its own, else its training data's (see the module)."""
    if named is not None:
        return codec_for(named)
    own = find_tokenizer(checkpoint)
    if own is not None:
        return codec_for(str(own))
    data_path = config.get("data", {}).get("path")
    meta = Path(str(data_path)) / "meta.json" if data_path else None
    if meta is not None and meta.is_file():
        try:
            return codec_for(str(json.loads(meta.read_text())["tokenizer"]))
        except (ValueError, KeyError, TypeError):
            pass  # that dataset moved or changed: no tokenizer from there
    raise ValueError(
        f"checkpoint {str(checkpoint)!r} has no tokenizer (no tokenizer.json, and its training data's "
        "meta.json names none that exists); pass --tokenizer PATH (a tokenizer.json, or 'gpt2')"
    )


def codec_for(named: str) -> TextCodec:
    """A tokenizer by name or path, with the settings and chat template beside its tokenizer.json."""
    tokenizer = load_tokenizer(named)
    if named == GPT2_NAME:
        return TextCodec(tokenizer)
    file = Path(named)
    if file.is_dir():
        file = find_tokenizer(file) or file
    settings = _read_settings(file.parent / "tokenizer_config.json")
    template = settings.get("chat_template")
    if (file.parent / "chat_template.jinja").is_file():
        template = (file.parent / "chat_template.jinja").read_text(encoding="utf-8")
    return TextCodec(tokenizer, settings, template if isinstance(template, str) else None)


def _read_settings(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None
    return settings if isinstance(settings, dict) else {}
