"""The client SDK: async and sync clients, their errors and result types, and the client CLI.

Users import these names from the top-level package (`from smartspec import Client`); this package
depends only on `smartspec.core` and the generated stubs.
"""
