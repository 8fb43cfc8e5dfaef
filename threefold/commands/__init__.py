"""The `threefold` subcommands; threefold/cli.py puts them under one argparse parser.

    args.py         the parser class, `[CONFIG.toml] [--section.key=value ...]` arguments, value checks
    run.py          train, bench: start the workers (threefold/launch.py) and run one rank's body
    show.py         config, schedule: print something, start nothing
    toml_writer.py  a resolved config (or one section of it) as TOML that loads back unchanged
    checkpoints.py  checkpoint convert, import-hf, export-hf
    infer.py        generate, eval: sample from or score a checkpoint under any layout

`data prepare` and `plan` keep their arguments beside their code (threefold/data/prepare.py,
threefold/plan/cli.py). Modules import torch and the training code only inside the functions that run a
command, so `threefold --help` answers at once.
"""
