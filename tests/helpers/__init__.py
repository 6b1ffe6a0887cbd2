"""Helpers shared by the tests, imported as ``from tests.helpers.<module> import ...`` (fixtures live
in the conftest.py of the directory whose tests use them).

common: tiny random models on disk, the test config of every registered method, subprocess env.
cli: the command line's one-line error, asserted.
export, patch, reliability, serving, training: builders for the tests of that directory.
fake_rank_method: a rank-allocating adapter method the training tests register.
trt_api: TensorRT's Python API read from its stubs, to check stand-ins and hypermerge's calls.
trt_stand_in: a stand-in tensorrt module for the refit code.
"""
