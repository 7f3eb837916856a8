"""The arena's files: created safely, private to the daemon, and watched.

Issue 11's attacks on the files: the arena had a predictable name in the arena directory, was
opened without ``O_EXCL``/``O_NOFOLLOW`` and then chmod'ed, so a symlink planted there made the
daemon truncate and re-mode any file it points at; a deleted or replaced arena went unnoticed (new
clients mapped an impostor file). Here each attack is planted before (or while) a real daemon
process runs: a symlink at the arena directory's path, or at the old file path; a directory there
owned by another user; a file deleted or replaced under a running daemon. The target must come out
untouched, the daemon must refuse to start with an error naming the path, and a deletion or
replacement must be listed in ``stats()["arena_problems"]`` and logged as an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import GID_A, TENANTS, UID_A, RawClient, SecDaemon, needs_root, run_as, wait_until

from memkv_mesh import protocol
from memkv_mesh.client import Client

pytestmark = [needs_root, pytest.mark.slow]

VICTIM = b"the test's own file; the daemon must neither truncate nor re-mode it\n" * 64


def _tag(data_dir: Path) -> str:
    return hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=4).hexdigest()


def arena_dir_of(dp: SecDaemon) -> Path:
    """``<arena_dir>/memkv-<node_id>-<hash of data_dir>/`` (docs/security.md, arena.py)."""
    return dp.arena_dir / f"memkv-{dp.node_id}-{_tag(dp.data_dir)}"


def old_arena_file_of(dp: SecDaemon) -> Path:
    """Where the main before issue 11 put the arena: a predictable file name, no directory."""
    return dp.arena_dir / f"memkv-{dp.node_id}-{_tag(dp.data_dir)}.arena"


def _victim(path: Path) -> tuple[bytes, int, int, int]:
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return _fingerprint(path)


def _fingerprint(path: Path) -> tuple[bytes, int, int, int]:
    st = os.lstat(path)
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_ino


def _start_refused(dp: SecDaemon, *fragments: str) -> str:
    """The daemon exits instead of serving; its output names every fragment."""
    with pytest.raises(RuntimeError) as e:
        dp.start(timeout=30)
    text = str(e.value)
    assert "exited" in text, text
    for f in fragments:
        assert f in text, f"{f!r} not in the daemon's error: {text[-1500:]}"
    return text


def _problems(dp: SecDaemon) -> list[str]:
    with dp.client() as c:
        return list(c.stats()["arena_problems"])


def _error_logged(dp: SecDaemon, fragment: str) -> bool:
    for line in dp.log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("level") in ("error", "critical") and fragment in line:
            return True
    return False


def _put_get(dp: SecDaemon) -> bytes | None:
    key, value = os.urandom(32), os.urandom(30_000)
    with Client(dp.sock, timeout=30) as c:
        assert c.put(key, value)
        lease = c.get(key)
        try:
            return None if lease is None else bytes(lease.view)
        finally:
            if lease is not None:
                lease.release()


# ---- modes and owners ----------------------------------------------------------------------------
def _assert_private(d: Path, names: set[str]) -> None:
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode), f"{d} is not a directory"
    assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    assert st.st_uid == os.geteuid()  # the daemon's (it runs as this test's user)
    assert set(os.listdir(d)) == names
    for n in names:
        fst = os.lstat(d / n)
        assert stat.S_ISREG(fst.st_mode), n
        assert stat.S_IMODE(fst.st_mode) == 0o600, (n, oct(fst.st_mode))
        assert fst.st_uid == os.geteuid(), n


def test_single_tenant_arena_is_a_private_directory(sec_daemon: Any) -> None:
    dp = sec_daemon()
    _assert_private(arena_dir_of(dp), {"default.arena"})
    assert not old_arena_file_of(dp).exists()
    # zero config: the socket stays 0660 (whoever may connect is the one tenant)
    assert stat.S_IMODE(os.stat(dp.sock).st_mode) == 0o660
    with RawClient(dp.sock) as raw:
        w = raw.hello()
        assert isinstance(w, protocol.Welcome), w
        assert Path(w.arena_path) == arena_dir_of(dp) / "default.arena"
        assert raw.fds and os.fstat(raw.fds[0]).st_ino == os.stat(w.arena_path).st_ino
    assert _put_get(dp) is not None
    dp.stop()
    assert not arena_dir_of(dp).exists(), "a daemon that stops removes its arena directory"


def test_tenant_arena_has_one_private_file_per_segment(sec_daemon: Any) -> None:
    dp = sec_daemon(TENANTS, store={"dram_bytes": 48 << 20, "max_block_bytes": 1 << 20})
    _assert_private(arena_dir_of(dp), {"_mesh.arena"} | {f"{t['name']}.arena" for t in TENANTS})


def test_restart_after_kill9_reuses_its_own_directory(sec_daemon: Any) -> None:
    dp = sec_daemon()
    d = arena_dir_of(dp)
    dp.kill()
    assert d.is_dir()  # left behind by the dead daemon
    (d / "default.arena").chmod(0o666)  # a stale file with a loose mode must not survive as is
    dp.stop()
    dp.start()
    _assert_private(d, {"default.arena"})
    assert _put_get(dp) is not None


# ---- planted paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["to_file", "to_dir"])
def test_symlink_at_the_arena_directory_is_refused(sec_daemon: Any, tmp_path: Path, kind: str) -> None:
    dp = sec_daemon(start=False)
    dp.arena_dir.mkdir(parents=True)
    if kind == "to_file":
        victim = tmp_path / "victim"
        target = victim
    else:
        target = tmp_path / "attacker-dir"
        target.mkdir()
        target.chmod(0o777)
        victim = target / "default.arena"
    before = _victim(victim)
    target_mode = stat.S_IMODE(os.lstat(target).st_mode)
    link = arena_dir_of(dp)
    link.symlink_to(target)
    _start_refused(dp, str(link))
    assert _fingerprint(victim) == before, "the daemon changed the file the symlink points at"
    assert stat.S_IMODE(os.lstat(target).st_mode) == target_mode
    assert link.is_symlink() and os.readlink(link) == str(target), "the daemon touched the planted link"
    if kind == "to_dir":
        assert os.listdir(target) == ["default.arena"]


def test_symlink_at_the_old_arena_file_path_is_not_followed(sec_daemon: Any, tmp_path: Path) -> None:
    """The old predictable name: on the old main this truncated the victim and chmod'ed it 0660."""
    dp = sec_daemon(start=False)
    dp.arena_dir.mkdir(parents=True)
    victim = tmp_path / "victim"
    before = _victim(victim)
    old = old_arena_file_of(dp)
    old.symlink_to(victim)
    try:
        dp.start(timeout=30)
    except RuntimeError:
        pass  # refusing is fine too; what matters is the victim
    assert _fingerprint(victim) == before, "the daemon followed the planted symlink"


def test_directory_owned_by_another_user_is_refused(sec_daemon: Any) -> None:
    dp = sec_daemon(start=False)
    dp.arena_dir.mkdir(parents=True)
    d = arena_dir_of(dp)
    d.mkdir(mode=0o755)
    os.chown(d, UID_A, UID_A)
    planted = d / "default.arena"
    _victim(planted)
    os.chown(planted, UID_A, UID_A)
    before = _fingerprint(planted)
    _start_refused(dp, str(d), str(UID_A))
    assert _fingerprint(planted) == before
    st = os.lstat(d)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID_A, 0o755), "the daemon took over the directory"


# ---- watched while running -----------------------------------------------------------------------
def test_deleted_arena_file_is_reported(sec_daemon: Any) -> None:
    dp = sec_daemon()
    f = arena_dir_of(dp) / "default.arena"
    assert _problems(dp) == []
    f.unlink()
    wait_until(lambda: any("default.arena" in p for p in _problems(dp)), 10, "the deletion in arena_problems")
    assert _error_logged(dp, "default.arena"), "the deletion is not logged as an error"
    # The daemon keeps serving from the file it holds.
    assert _put_get(dp) is not None


@pytest.mark.parametrize("tenants", [False, True], ids=["single", "tenants"])
def test_replaced_arena_file_is_reported_and_never_handed_out(sec_daemon: Any, tenants: bool) -> None:
    if tenants:
        dp = sec_daemon(TENANTS, store={"dram_bytes": 48 << 20, "max_block_bytes": 1 << 20})
        name = "alpha.arena"
    else:
        dp = sec_daemon()
        name = "default.arena"
    f = arena_dir_of(dp) / name
    size = f.stat().st_size
    impostor = f.with_name("impostor.tmp")
    impostor.write_bytes(b"\xee" * size)
    impostor.chmod(0o600)
    os.replace(impostor, f)
    imp_ino = f.stat().st_ino
    wait_until(lambda: any(name in p for p in _problems(dp)), 10, f"the replaced {name} in arena_problems")
    assert _error_logged(dp, name), "the replacement is not logged as an error"
    # A new client is handed the daemon's real segment, never the file now at the path, and its
    # puts land there.
    uid, gid = (UID_A, GID_A) if tenants else (os.geteuid(), os.getegid())
    fd_ino, got = run_as(uid, gid, _new_client, dp.sock)
    assert fd_ino is not None and fd_ino != imp_ino
    assert got is not None
    assert f.read_bytes() == b"\xee" * size, "a client wrote into the impostor file"


def _new_client(sock: Path) -> tuple[int | None, bytes | None]:
    with RawClient(sock) as raw:
        assert isinstance(raw.hello(), protocol.Welcome)
        ino = os.fstat(raw.fds[0]).st_ino if raw.fds else None
    key, value = os.urandom(32), os.urandom(30_000)
    with Client(sock, timeout=30) as c:
        assert c.put(key, value)
        with c.get_many([key]) as lease:
            v = lease.views[0]
            return ino, None if v is None else bytes(v)
