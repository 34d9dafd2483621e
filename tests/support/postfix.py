"""A private Postfix instance used as the real downstream MTA in tests.

Each instance has its own config and queue directories under a base directory in /tmp, an
smtpd on 127.0.0.1:<free port> only, and delivers the virtual domain ``relay.test`` to
Maildirs under ``<base>/mail``. It never touches /etc/postfix/main.cf or port 25.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .ports import LOOPBACK, free_port
from .wait import WaitTimeout, wait_until

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"

DOMAIN = "relay.test"
USERS: tuple[str, ...] = ("alice", "bob", "carol")
MESSAGE_SIZE_LIMIT = 200_000_000
# The virtual(8) delivery agent writes the Maildirs as this uid/gid (nobody/nogroup).
MAIL_UID = 65534
MAIL_GID = 65534

_POLL_INTERVAL = 0.05
_QUEUE_POLL_INTERVAL = 0.1  # each look at the queue runs postqueue(1)

# Every service runs unchrooted ("n" in the chroot column): a chrooted daemon would need
# copies of /etc files inside the queue directory, which Debian's init scripts normally
# provide and `postfix start` does not.
_MASTER_CF = """\
{listen} inet  n       -       n       -       200     smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
postlog   unix-dgram n  -       n       -       1       postlogd
"""



def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


_HAS_IPV6_LOOPBACK = _ipv6_loopback()

class PostfixError(RuntimeError):
    """Postfix could not be set up, started, stopped, or did not reach an expected state."""


def _make_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    # chmod explicitly: mkdir's mode is filtered by the umask, and Postfix refuses group- or
    # world-writable queue paths as well as paths its unprivileged daemons cannot traverse.
    path.chmod(mode)
    return path


def _check_parents_traversable(path: Path) -> None:
    """Fail early, with a clear message, if a parent directory would lock Postfix out."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise PostfixError(
                f"{parent} has mode {oct(mode & 0o7777)}: every directory above a Postfix "
                "queue or mail directory must be world-searchable (e.g. 755). pytest's "
                "tmp_path dirs are 0700; use a directory under /tmp instead."
            )


class PostfixInstance:
    """A private Postfix 3.7 with its own config/queue directories and a loopback smtpd."""

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        extra_settings: Mapping[str, str] | None = None,
    ) -> None:
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="relayproxy-postfix-", dir="/tmp"))
        self.base_dir: Path = _make_dir(Path(base_dir))
        _check_parents_traversable(self.base_dir)
        self.host: str = LOOPBACK
        self.port: int = port if port is not None else free_port()
        self.config_dir: Path = self.base_dir / "etc"
        self.queue_dir: Path = self.base_dir / "queue"
        self.data_dir: Path = self.base_dir / "data"
        self.mail_dir: Path = self.base_dir / "mail"
        self.log_dir: Path = self.base_dir / "log"
        self.maillog: Path = self.log_dir / "maillog"
        self.users: tuple[str, ...] = USERS
        self.domain: str = DOMAIN
        self._running = False
        self._extra_settings = dict(extra_settings or {})
        self._write_config()

    # ----------------------------------------------------------------- configuration

    def _write_config(self) -> None:
        for directory in (self.config_dir, self.queue_dir, self.log_dir):
            _make_dir(directory)
        # data_directory must belong to mail_owner; `postfix start` creates it with the right
        # owner when missing, so it is deliberately not created here.
        _make_dir(self.mail_dir)
        # virtual(8) creates each user's Maildir with the user's (static) uid, so the
        # mailbox base must be writable by that uid.
        os.chown(self.mail_dir, MAIL_UID, MAIL_GID)

        vmailbox = self.config_dir / "vmailbox"
        vmailbox.write_text(
            "".join(f"{user}@{DOMAIN} {DOMAIN}/{user}/\n" for user in self.users)
        )

        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "loopback-only",
            # IPv6 too where the machine has ::1, so XCLIENT ADDR=IPV6:... is understood
            "inet_protocols": "all" if _HAS_IPV6_LOOPBACK else "ipv4",
            "mynetworks": "127.0.0.0/8" + (" [::1]/128" if _HAS_IPV6_LOOPBACK else ""),
            "smtpd_banner": "$myhostname ESMTP",
            # Behave like a final-destination MX: the default would let 127.0.0.0/8 relay
            # anywhere, hiding proxy bugs that forward mail for foreign domains.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "smtpd_reject_unlisted_recipient": "yes",
            "smtpd_authorized_xclient_hosts": "$mynetworks",
            "smtputf8_enable": "yes",
            "message_size_limit": str(MESSAGE_SIZE_LIMIT),
            "mailbox_size_limit": "0",
            "virtual_mailbox_limit": "0",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_maps": f"texthash:{vmailbox}",
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_uid_maps": f"static:{MAIL_UID}",
            "virtual_gid_maps": f"static:{MAIL_GID}",
            "virtual_alias_maps": "",
            # No DNS anywhere: tests must not depend on the machine's resolver.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            # The default 1 s penalty after errors would make fault-injection tests slow
            # without testing anything about the proxy.
            "smtpd_error_sleep_time": "0s",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.log_dir),
            "biff": "no",
            "append_dot_mydomain": "no",
            "delay_warning_time": "0h",
            **self._extra_settings,
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(listen=f"{self.host}:{self.port}")
        )

    # ------------------------------------------------------------------ life cycle

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 30) -> None:
        """Start the instance and wait (bounded) until smtpd answers with a 220 greeting."""
        result = self._postfix("start", timeout=timeout)
        if result.returncode != 0:
            raise PostfixError(
                f"postfix start failed (exit {result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n--- maillog tail ---\n{self.log_tail()}"
            )
        self._running = True
        last_error = "no attempt made"

        def greets() -> bool:
            nonlocal last_error
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    greeting = sock.makefile("rb").readline()
                    sock.sendall(b"QUIT\r\n")
            except OSError as exc:
                last_error = repr(exc)
                return False
            if greeting.startswith(b"220 "):
                return True
            last_error = f"unexpected greeting {greeting!r}"
            return False

        wait_until(
            greets,
            f"postfix smtpd on {self.host}:{self.port} to answer 220",
            timeout,
            interval=_POLL_INTERVAL,
            describe=lambda: f"last: {last_error}\n--- maillog tail ---\n{self.log_tail()}",
            error=PostfixError,
        )

    def master_pid(self) -> int | None:
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            return int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, timeout: float = 20) -> None:
        """Stop the instance with `postfix stop` and verify the master process is gone."""
        pid = self.master_pid()
        if pid is None and not self._running:
            return
        result = self._postfix("stop", timeout=timeout)
        if pid is not None and not _wait_pid_gone(pid, timeout):
            # `postfix abort` is the documented escalation; it still addresses only this
            # instance's master (through its own pid file), never other Postfix processes.
            self._postfix("abort", timeout=timeout)
            if not _wait_pid_gone(pid, timeout):
                raise PostfixError(
                    f"postfix master pid {pid} still running after stop and abort:\n"
                    f"{result.stdout}{result.stderr}"
                )
        self._running = False
        if _port_open(self.host, self.port):
            raise PostfixError(f"port {self.host}:{self.port} still accepts after postfix stop")

    def remove(self) -> None:
        """Delete the base directory. Only call after stop()."""
        if self._running:
            raise PostfixError("remove() called on a running Postfix instance")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ mailboxes

    def _user_dirs(self, user: str | None) -> list[Path]:
        users: Iterable[str] = self.users if user is None else (user,)
        return [self.mail_dir / DOMAIN / name for name in users]

    def _delivered_files(self, user: str | None) -> list[Path]:
        files: list[Path] = []
        for maildir in self._user_dirs(user):
            for sub in ("new", "cur"):
                folder = maildir / sub
                if folder.is_dir():
                    files.extend(p for p in folder.iterdir() if p.is_file())
        # Maildir names start with the delivery time, so (mtime, name) gives delivery order.
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return files

    def deliveries(self, user: str | None = None) -> list[bytes]:
        """Raw bytes of every delivered message (for one user, or all users)."""
        return [p.read_bytes() for p in self._delivered_files(user)]

    def wait_for_deliveries(
        self, n: int, timeout: float = 20, user: str | None = None
    ) -> list[bytes]:
        """Wait until at least ``n`` messages are delivered; return all delivered messages."""
        wait_until(
            lambda: len(self._delivered_files(user)) >= n,
            f"{n} delivered message(s) for {user or 'any user'}",
            timeout,
            interval=_POLL_INTERVAL,
            describe=lambda: (
                f"found {len(self._delivered_files(user))}; queue:\n{self.queue_listing()}\n"
                f"--- maillog tail ---\n{self.log_tail()}"
            ),
        )
        return self.deliveries(user)

    def clear_mailboxes(self) -> None:
        """Remove delivered (and in-flight tmp/) files so tests do not see each other's mail."""
        for maildir in self._user_dirs(None):
            for sub in ("new", "cur", "tmp"):
                folder = maildir / sub
                if folder.is_dir():
                    for entry in folder.iterdir():
                        entry.unlink(missing_ok=True)

    # ------------------------------------------------------------------ queue

    def queue_listing(self) -> str:
        result = subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-p"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout + result.stderr

    def queue_empty(self) -> bool:
        return "Mail queue is empty" in self.queue_listing()

    def wait_queue_empty(self, timeout: float = 20) -> None:
        """Wait until nothing is queued, so "nothing was delivered" assertions are final."""
        wait_until(
            self.queue_empty,
            "the Postfix queue to be empty",
            timeout,
            interval=_QUEUE_POLL_INTERVAL,
            describe=lambda: (
                f"queue:\n{self.queue_listing()}\n--- maillog tail ---\n{self.log_tail()}"
            ),
        )

    def purge_queue(self) -> None:
        """Delete every queued message (e.g. deferred leftovers of an earlier test)."""
        subprocess.run(
            [POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"],
            capture_output=True,
            timeout=30,
            check=False,
        )

    def reset(self, timeout: float = 10) -> None:
        """Bring the instance to a clean state between tests: empty queue, empty mailboxes.

        A message still queued after ``timeout`` belongs to an earlier test (e.g. deferred);
        it is purged rather than failing the next, unrelated test.
        """
        try:
            wait_until(
                self.queue_empty, "the Postfix queue to be empty", timeout,
                interval=_QUEUE_POLL_INTERVAL,
            )
        except WaitTimeout:
            self.purge_queue()
            self.wait_queue_empty(timeout)
        self.clear_mailboxes()

    # ------------------------------------------------------------------ logs

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    try:
        wait_until(
            lambda: not _pid_alive(pid), f"pid {pid} to exit", timeout, interval=_POLL_INTERVAL
        )
    except WaitTimeout:
        return False
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


__all__ = ["DOMAIN", "USERS", "PostfixError", "PostfixInstance"]
