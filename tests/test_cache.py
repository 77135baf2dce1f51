"""The directory cache under concurrent processes: the ranks of one launch, or the runs of a sweep, asking for the same
entry at the same moment. Every call returns a complete entry and never fails because of another process, a build runs
once however many processes wait for it, and an interrupted build leaves nothing that is trusted."""

import hashlib
import multiprocessing
import os
import random
import signal
import time
import traceback
import uuid

import pytest

from minorsft_trl.cache import cached_directory, is_complete

PROCESSES = 6
CALLS = 40
TIMEOUT = 60

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="forks the test's processes"
)
context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def contents(key):
    """What the build writes for `key`: several files, one large enough that copying or deleting it takes a while."""
    seed = hashlib.sha256(repr(sorted(key.items())).encode()).digest()
    return {"a.bin": seed * 8192, "b.txt": f"{key}\n".encode(), "sub/c.txt": seed.hex().encode()}


def build_for(key, builds_dir=None, delay=0.0):
    def build(out):
        if builds_dir is not None:
            (builds_dir / uuid.uuid4().hex).touch()
        time.sleep(delay)
        for name, data in contents(key).items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)

    return build


def read_back(path):
    return {name: (path / name).read_bytes() for name in contents({"v": 0})}


def run_together(worker, *args, processes=PROCESSES):
    """Run `worker(rank, barrier, *args)` in `processes` forked processes started together; their returned lists,
    concatenated."""
    barrier, results = context.Barrier(processes), context.Queue()

    def main(rank):
        try:
            results.put(worker(rank, barrier, *args))
        except BaseException:
            results.put([f"rank {rank} crashed: {traceback.format_exc()}"])

    workers = [context.Process(target=main, args=(rank,)) for rank in range(processes)]
    for process in workers:
        process.start()
    try:
        collected = [item for _ in workers for item in results.get(timeout=TIMEOUT)]
    finally:
        for process in workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return collected


def hammer(rank, barrier, entry, mode):
    """`CALLS` calls in lockstep with the other ranks, each read back at once. "forced rebuilds": one key, and about a
    quarter of the calls reject the entry, so it is replaced while others read it; "alternating keys": each rank
    switches between two keys, so almost every call replaces the entry another rank was just handed."""
    rng = random.Random(rank)
    outcomes = []
    for call in range(CALLS):
        key = {"v": (call + rank) % 2 if mode == "alternating keys" else 0}
        expected = contents(key)
        seen_by_verify = []

        def verify(path, expected=expected, seen_by_verify=seen_by_verify):
            seen_by_verify.append(read_back(path) == expected)
            return rng.random() >= 0.25 if mode == "forced rebuilds" else True

        barrier.wait(timeout=TIMEOUT)
        try:
            path = cached_directory(entry, key, build_for(key), verify=verify)
            got = read_back(path)
            complete = is_complete(path, key)
        except Exception as error:
            outcomes.append(f"{type(error).__name__}: {error}")
            continue
        if not all(seen_by_verify):
            outcomes.append("verify was shown an entry for another key")
        elif mode == "forced rebuilds" and not (got == expected and complete):
            # Replacements rebuild this same key, so whatever the path shows must be the complete entry for it
            outcomes.append("the returned entry is not the complete one for the key")
        elif any(data not in (contents({"v": 0})[name], contents({"v": 1})[name]) for name, data in got.items()):
            # Another key may have replaced the entry since the call returned, even between two reads, but each read
            # finds a file of a complete entry: never a missing or partial one
            outcomes.append("a file of the returned entry is missing or partial")
        else:
            outcomes.append("ok")
    return outcomes


@pytest.mark.parametrize("mode", ["forced rebuilds", "alternating keys"])
def test_concurrent_calls_all_return_a_complete_entry(tmp_path, mode):
    outcomes = run_together(hammer, tmp_path / "cache" / "entry", mode)
    failures = [outcome for outcome in outcomes if outcome != "ok"]
    print(f"{mode}: {len(failures)} of {len(outcomes)} calls failed")
    assert len(outcomes) == PROCESSES * CALLS
    assert not failures, f"{len(failures)} of {len(outcomes)} calls failed, e.g. {sorted(set(failures))[:5]}"
    # Between calls the cache directory holds the entry alone: no lock file, staging or replaced directory left over
    assert [path.name for path in (tmp_path / "cache").iterdir()] == ["entry"]


def ask_once(rank, barrier, entry, builds_dir):
    barrier.wait(timeout=TIMEOUT)
    key = {"v": 0}
    path = cached_directory(entry, key, build_for(key, builds_dir, delay=0.5))
    return ["ok" if read_back(path) == contents(key) and is_complete(path, key) else f"rank {rank}: wrong entry"]


def test_a_missing_entry_is_built_once_by_concurrent_callers(tmp_path):
    builds = tmp_path / "builds"
    builds.mkdir()
    assert run_together(ask_once, tmp_path / "cache" / "entry", builds) == ["ok"] * PROCESSES
    assert len(list(builds.iterdir())) == 1


def test_a_rejected_entry_is_rebuilt_once_by_concurrent_callers(tmp_path):
    """Processes that all reject the same entry wait for the one rebuilding it, and then trust its new build."""
    entry, builds = tmp_path / "cache" / "entry", tmp_path / "builds"
    builds.mkdir()
    cached_directory(entry, {"v": 0}, build_for({"v": 0}))
    (entry / "b.txt").write_text("tampered")
    assert run_together(ask_once, entry, builds) == ["ok"] * PROCESSES
    assert len(list(builds.iterdir())) == 1


def test_an_interrupted_build_leaves_nothing_trusted_and_a_later_call_builds(tmp_path):
    entry, key = tmp_path / "cache" / "entry", {"v": 0}

    def crash(out):
        (out / "a.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached_directory(entry, key, crash)
    assert not is_complete(entry, key) and list(entry.parent.iterdir()) == []
    assert read_back(cached_directory(entry, key, build_for(key))) == contents(key)

    # Interrupted while replacing a stale entry: the stale entry stays, still not trusted for the new key
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_directory(entry, {"v": 1}, crash)
    assert is_complete(entry, key) and not is_complete(entry, {"v": 1})
    assert read_back(cached_directory(entry, {"v": 1}, build_for({"v": 1}))) == contents({"v": 1})


def test_a_build_killed_while_holding_the_lock_does_not_block_the_next_call(tmp_path):
    entry, key, started = tmp_path / "cache" / "entry", {"v": 0}, tmp_path / "started"

    def hang(out):
        (out / "a.bin").write_bytes(b"half")
        started.touch()
        time.sleep(TIMEOUT)

    process = context.Process(target=cached_directory, args=(entry, key, hang))
    process.start()
    deadline = time.monotonic() + TIMEOUT
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=TIMEOUT)
    assert not is_complete(entry, key)
    assert read_back(cached_directory(entry, key, build_for(key))) == contents(key)
