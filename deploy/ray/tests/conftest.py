"""Loopback only: every Ray process of these tests uses 127.0.0.1 (Ray reads this when it is
first imported: with it, Ray resolves "this node" to the loopback address instead of the
machine's interface address)."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
