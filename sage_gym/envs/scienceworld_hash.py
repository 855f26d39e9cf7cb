"""ScienceWorld's ``EnvObject`` with a ``hashCode`` that agrees with its ``equals``: both read the object's uuid.

The simulator compares objects by ``uuid`` (a counter it resets at every task load) but leaves
``hashCode`` to Java's identity hash, so the order of its hash sets (object lists, ambiguity menus,
even gold paths) depends on identity hashes. A JVM flag can make those repeatable only by giving
every object the same hash (``-XX:hashCode=2``), which turns the hash sets into linear scans (steps
1.2-2x slower); a sequence (``-XX:hashCode=3``) is not repeatable across loads in one JVM (its counter
runs on). Hashing by uuid is repeatable per load and spreads the objects over the buckets.

``patched_classes(jar)`` writes ``scienceworld/struct/EnvObject.class`` with one method added,
``public int hashCode() { return java.lang.Long.hashCode(this.uuid); }``, into a folder that goes on
the classpath before the jar. The class file is edited as bytes (JVM spec chapter 4): constant pool
entries and a method are appended; nothing else changes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from pathlib import Path

CLASS = "scienceworld/struct/EnvObject.class"
_WIDE = {5, 6}  # Long and Double constants take two constant-pool slots
_SIZES = {3: 4, 4: 4, 5: 8, 6: 8, 7: 2, 8: 2, 9: 4, 10: 4, 11: 4, 12: 4, 15: 3, 16: 2, 17: 4, 18: 4, 19: 2, 20: 2}


def _constants(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The constant pool as (tag, body) per slot (None for the second slot of a wide entry) and its end offset."""
    count = struct.unpack_from(">H", data, 8)[0]
    pool: list = [None]
    at, index = 10, 1
    while index < count:
        tag = data[at]
        size = 2 + struct.unpack_from(">H", data, at + 1)[0] if tag == 1 else _SIZES[tag]
        pool.append((tag, data[at + 1:at + 1 + size]))
        at += 1 + size
        index += 1
        if tag in _WIDE:
            pool.append(None)
            index += 1
    return pool, at


def add_uuid_hash_code(data: bytes) -> bytes:
    """The class file ``data`` of EnvObject with ``hashCode()`` returning ``Long.hashCode(uuid)``."""
    pool, end = _constants(data)
    utf8 = {e[1][2:].decode("utf-8", "replace"): i for i, e in enumerate(pool) if e is not None and e[0] == 1}
    # after the pool: access, this, super, interfaces, fields, then the methods
    this_class = struct.unpack_from(">H", data, end + 2)[0]
    at = end + 6
    at += 2 + 2 * struct.unpack_from(">H", data, at)[0]
    at, _ = _members(data, at)
    _, methods = _members(data, at)
    if (utf8.get("hashCode"), utf8.get("()I")) in methods:
        raise ValueError(f"{CLASS} already declares hashCode(): this ScienceWorld version needs no patch")
    entries: list[bytes] = []

    def add(tag: int, body: bytes) -> int:
        entries.append(bytes([tag]) + body)
        return len(pool) + len(entries) - 1

    def text(s: str) -> int:
        if s in utf8:
            return utf8[s]
        utf8[s] = add(1, struct.pack(">H", len(s)) + s.encode())
        return utf8[s]

    uuid_type = add(12, struct.pack(">HH", text("uuid"), text("J")))
    uuid_field = add(9, struct.pack(">HH", this_class, uuid_type))
    long_class = add(7, struct.pack(">H", text("java/lang/Long")))
    hash_type = add(12, struct.pack(">HH", text("hashCode"), text("(J)I")))
    long_hash = add(10, struct.pack(">HH", long_class, hash_type))
    name, descriptor, code_name = text("hashCode"), text("()I"), text("Code")
    # aload_0; getfield uuid; invokestatic Long.hashCode(J)I; ireturn
    code = b"\x2a\xb4" + struct.pack(">H", uuid_field) + b"\xb8" + struct.pack(">H", long_hash) + b"\xac"
    body = struct.pack(">HHI", 2, 1, len(code)) + code + struct.pack(">HH", 0, 0)
    method = struct.pack(">HHHH", 0x0001, name, descriptor, 1) + struct.pack(">HI", code_name, len(body)) + body

    new_count = struct.pack(">H", len(pool) + len(entries))
    return (data[:8] + new_count + data[10:end] + b"".join(entries) + data[end:at]
            + struct.pack(">H", len(methods) + 1) + method + data[at + 2:])


def _members(data: bytes, at: int) -> tuple[int, list[tuple[int, int]]]:
    """The fields (or methods) table at ``at``: its end offset and each member's (name, descriptor) indexes."""
    count = struct.unpack_from(">H", data, at)[0]
    at, members = at + 2, []
    for _ in range(count):
        _, name, descriptor, attributes = struct.unpack_from(">HHHH", data, at)
        members.append((name, descriptor))
        at += 8
        for _ in range(attributes):
            at += 6 + struct.unpack_from(">I", data, at + 2)[0]
    return at, members


def patched_classes(jar: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """A folder holding the patched EnvObject class of ``jar`` (built once per jar version under
    $SAGE_CACHE/scienceworld-classes), to put on the classpath before the jar."""
    with zipfile.ZipFile(jar) as archive:
        original = archive.read(CLASS)
    root = Path(cache or os.environ.get("SAGE_CACHE", Path.home() / ".cache" / "sage")) / "scienceworld-classes"
    folder = root / hashlib.sha256(original).hexdigest()[:16]
    target = folder / CLASS
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(add_uuid_hash_code(original))
        os.replace(tmp, target)  # atomic: envs starting at once in several processes never read half a class
    return folder
