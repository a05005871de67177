"""Lists of brokers, and the endpoints of broker shards (docs/OPERATIONS.md "Shards").

A client or a worker may be given several brokers: a list in Python, a comma-separated
list in the CLI (``tcp://10.0.0.1:5555,tcp://10.0.0.2:5555``). ``fastbroker broker
--shards N`` runs N brokers whose endpoints follow from the ones given: shard k adds k
to a tcp port and ``.k`` to an ipc path (shard 0 keeps them as given), and so does
each shard's ``--store`` file.
"""

from __future__ import annotations

import re
from typing import List, Sequence, Union

from fastbroker._common import ConfigError

Addresses = Union[str, Sequence[str]]
"""One broker's address, or a list of them (a str with commas is a list)."""

_TCP = re.compile(r"^(tcp://.*:)(\d+)$")


def split_addresses(addresses: Addresses) -> List[str]:
    """The brokers of `addresses`, in order: a list (or tuple), or a str that may hold
    several, comma-separated. ConfigError for an empty list, an empty item or one given
    twice."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    if not items:
        raise ConfigError("no broker address given")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"an empty broker address in {addresses!r}")
        out.append(item.strip())
    if len(set(out)) != len(out):
        raise ConfigError(f"a broker address given twice in {addresses!r}")
    return out


def shard_address(address: str, shard: int) -> str:
    """The endpoint of `shard` (0, 1, ...) of a broker run with --shards: a tcp port
    plus the shard's number, an ipc path with ``.N`` appended (shard 0: as given).
    ConfigError for an endpoint that cannot be numbered so (a wildcard port, inproc)."""
    if shard == 0:
        return address
    match = _TCP.match(address)
    if match:
        port = int(match.group(2)) + shard
        if port > 65535:
            raise ConfigError(f"{address}: shard {shard} would need port {port}, above 65535")
        return f"{match.group(1)}{port}"
    if address.startswith("ipc://"):
        return f"{address}.{shard}"
    raise ConfigError(
        f"{address}: with --shards, every endpoint needs a fixed tcp port (shard N adds N to it) or an ipc path"
    )


def shard_path(path: str, shard: int) -> str:
    """The store file of `shard`: shard 0's is `path`, shard N's `path.N`."""
    return path if shard == 0 else f"{path}.{shard}"


__all__ = ["Addresses", "split_addresses", "shard_address", "shard_path"]
