"""The rank grid and everything that communicates inside a layer or a step.

mesh (the one rank grid and its groups), comm (differentiable collectives), layers (tensor-parallel
linears and embedding), data_parallel (gradient buckets and ZeRO-1), track (the communication progress
the watchdog reads).
"""
