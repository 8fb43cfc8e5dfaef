"""Inference: a KV cache, batched generation under tensor and pipeline parallelism, evaluation.

cache.py     the preallocated key/value cache of this rank's layers, and the per-row slot bookkeeping
step.py      one forward over new tokens of a (pipeline stage of a) Transformer, reading the cache
sampling.py  greedy, temperature, top-k and top-p choice of the next token
generate.py  the loop: prefill, decode, stop at EOS, across pipeline stages
load.py      a checkpoint of any layout into an inference model, its config and its tokenizer
evaluate.py  loss and perplexity over a prepared split, in consecutive windows
"""
