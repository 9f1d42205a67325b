"""The shared core: what the controller, the worker, the SDK and the benchmarks all build on.

Configuration and security helpers, process launching, the acceptance and cost-model math, the
policies and their optimiser. It imports nothing of ours but the generated stubs (`smartspec.v1`);
the contract is in pyproject.toml (`[tool.importlinter]`) and checked by the test suite.
"""
