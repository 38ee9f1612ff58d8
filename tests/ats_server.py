"""A private Apache Traffic Server for the tests, on a free loopback port, in a
temporary directory of its own (never the system service: docs/ats.md, "Building").

    with AtsServer(origin.url, plugins=["/path/plugin.so arg script.lua"]) as ats:
        urllib.request.urlopen(ats.url + "/x")
        ats.diags()          # the text of diags.log (TSNote / TSError of plugins)

It writes a run-root YAML and the config files (records.config, remap.config mapping
``/`` to the origin, storage.config, ip_allow.yaml, plugin.config, and the empty files
that only silence warnings), starts ``traffic_server --run-root=FILE`` in a process
group of its own and waits until a request through it answers (a probe path,
``PROBE_PATH``, which reaches the origin). A port clash or an instance that dies or
hangs at start-up is retried on another port, then raises ``AtsError`` with the tail
of diags.log and of stderr. ``stop()`` sends SIGTERM, then SIGKILL to the group.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence

TRAFFIC_SERVER = shutil.which("traffic_server") or "/usr/bin/traffic_server"
TRAFFIC_MANAGER = shutil.which("traffic_manager") or "/usr/bin/traffic_manager"
TRAFFIC_CTL = shutil.which("traffic_ctl") or "/usr/bin/traffic_ctl"
LIBDIR = "/usr/lib/trafficserver"
MODULES = "/usr/lib/trafficserver/modules"
BODY_FACTORY = "/etc/trafficserver/body_factory"
PROBE_PATH = "/__ats_ready"
"""The path start() asks for until ATS answers (it reaches the origin and the plugins)."""

_SETPRIV = shutil.which("setpriv")

_live: "set[AtsServer]" = set()
_live_lock = threading.Lock()


class AtsError(RuntimeError):
    """Traffic Server did not start (the message carries diags.log's and stderr's tail)."""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return f"({os.path.basename(path)}: none)"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:]) or f"({os.path.basename(path)}: empty)"


def _listening_pid_owns(pid: int, port: int) -> bool:
    """Whether process PID holds a listening TCP socket on PORT (so a probe answered by
    another process on a clashing port does not count)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    if not inodes:
        return False
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    except OSError:
        return False
    return False


def _probe(port: int, timeout: float) -> Optional[int]:
    """The status of one GET PROBE_PATH through port PORT, or None (no answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET " + PROBE_PATH.encode() +
                      b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                got = s.recv(4096)
                if not got:
                    break
                data += got
    except OSError:
        return None
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


class AtsServer:
    """A private traffic_server mapping every request to ORIGIN_URL.

    plugins: plugin.config lines (``/path/x.so arg ...``); cache: the HTTP cache on;
    threads: proxy.config.exec_thread.limit (ET_NET threads); records: more
    ``name: "TYPE value"`` lines for records.config (e.g.
    ``{"proxy.config.diags.debug.enabled": "INT 1"}``); env: more environment for the
    process (``PROXY_CONFIG_...`` overrides).

    Attributes once started: ``port``, ``url`` (``http://127.0.0.1:<port>``), ``pid``,
    ``root`` (the temporary directory), ``logdir``, ``diags_path``.
    """

    def __init__(self, origin_url: str, plugins: Sequence[str] = (), *, cache: bool = False,
                 threads: int = 2, records: Optional[Dict[str, str]] = None,
                 env: Optional[Dict[str, str]] = None, start_timeout: float = 10.0,
                 root: Optional[str] = None, manager: bool = False,
                 prefix: Sequence[str] = ()) -> None:
        self.origin_url = origin_url.rstrip("/")
        self.plugins = list(plugins)
        self.cache = cache
        self.threads = threads
        self.records = dict(records or {})
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.manager = manager
        self.prefix = list(prefix)  # a command that runs traffic_server (valgrind ...)
        self.stopped = False
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="hs-ats-")
        self.etc = os.path.join(self.root, "etc")
        self.logdir = os.path.join(self.root, "log")
        self.rundir = os.path.join(self.root, "run")
        self.cachedir = os.path.join(self.root, "cache")
        self.vardir = os.path.join(self.root, "var")
        self.diags_path = os.path.join(self.logdir, "diags.log")
        self.stdout_path = os.path.join(self.root, "stdout.txt")
        self.stderr_path = os.path.join(self.root, "stderr.txt")
        self.runroot_path = os.path.join(self.root, "runroot.yaml")
        self.port = 0
        self.url = ""
        self.proc: Optional[subprocess.Popen] = None
        self._reaper: Optional[threading.Thread] = None

    # ---- configuration ----

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.etc, name), "w") as f:
            f.write(text)

    def write_config(self) -> None:
        """(Re)write the run root and every config file for self.port."""
        for d in (self.etc, self.logdir, self.rundir, self.cachedir, self.vardir):
            os.makedirs(d, exist_ok=True)
        with open(self.runroot_path, "w") as f:
            f.write(f"prefix: /usr\nexec_prefix: /usr\nbindir: /usr/bin\nsbindir: /usr/sbin\n"
                    f"libdir: {LIBDIR}\nlibexecdir: {MODULES}\nincludedir: /usr/include\n"
                    f"sysconfdir: {self.etc}\nlogdir: {self.logdir}\nruntimedir: {self.rundir}\n"
                    f"cachedir: {self.cachedir}\ndatadir: {self.vardir}\n"
                    f"localstatedir: {self.vardir}\n")
        rec = {
            "proxy.config.admin.user_id": "STRING #-1",
            "proxy.config.http.server_ports": f"STRING {self.port}",
            "proxy.config.exec_thread.autoconfig": "INT 0",
            "proxy.config.exec_thread.limit": f"INT {int(self.threads)}",
            "proxy.config.url_remap.remap_required": "INT 1",
            "proxy.config.reverse_proxy.enabled": "INT 1",
            "proxy.config.http.cache.http": f"INT {1 if self.cache else 0}",
            "proxy.config.cache.ram_cache.size": "INT 16777216",
            "proxy.config.log.logging_enabled": "INT 0",
            "proxy.config.crash_log_helper": "STRING NULL",
            "proxy.config.diags.output.diag": "STRING L",
            "proxy.config.diags.output.note": "STRING L",
            "proxy.config.diags.output.status": "STRING L",
            "proxy.config.diags.output.warning": "STRING L",
            "proxy.config.diags.output.error": "STRING L",
            "proxy.config.http.wait_for_cache": "INT 1",
            "proxy.config.net.connections_throttle": "INT 4000",
        }
        if os.path.isdir(BODY_FACTORY):
            rec["proxy.config.body_factory.template_sets_dir"] = f"STRING {BODY_FACTORY}"
        rec.update(self.records)
        self._write("records.config",
                    "".join(f"CONFIG {k} {v}\n" for k, v in rec.items()))
        self._write("remap.config", f"map / {self.origin_url}/\n")
        self._write("storage.config", f"{self.cachedir} 64M\n")
        self._write("ip_allow.yaml",
                    "ip_allow:\n"
                    "  - apply: in\n    ip_addrs: 127.0.0.1\n    action: allow\n    methods: ALL\n"
                    "  - apply: in\n    ip_addrs: ::1\n    action: allow\n    methods: ALL\n")
        self._write("plugin.config", "".join(line + "\n" for line in self.plugins))
        for empty in ("cache.config", "parent.config", "volume.config", "hosting.config",
                      "ssl_multicert.config", "logging.yaml", "strategies.yaml",
                      "splitdns.config", "socks.config"):
            self._write(empty, "")
        self._write("sni.yaml", "sni: []\n")

    # ---- process ----

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.pop("TS_ROOT", None)
        env.update(self.env)
        # traffic_manager starts traffic_server itself (in this process group) and
        # relays traffic_ctl's messages to it
        cmd = [*self.prefix, TRAFFIC_MANAGER if self.manager else TRAFFIC_SERVER,
               f"--run-root={self.runroot_path}"]
        if _SETPRIV:  # dies with the test process even when that is SIGKILLed
            cmd = [_SETPRIV, "--pdeathsig", "KILL", "--"] + cmd
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=self.root, env=env, start_new_session=True)
        with _live_lock:
            _live.add(self)

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """traffic_ctl ARGS against this instance (needs manager=True)."""
        return subprocess.run([TRAFFIC_CTL, f"--run-root={self.runroot_path}", *args],
                              capture_output=True, text=True, timeout=timeout)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "AtsServer":
        """Start and wait until a request through it answers; retried on another port
        when the port was taken or the process died or hung (3 attempts)."""
        errors: List[str] = []
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.write_config()
            self._spawn()
            why = self._wait_ready(self.start_timeout)
            if why is None:
                return self
            errors.append(f"attempt {attempt + 1} (port {self.port}): {why}\n"
                          f"--- diags.log (tail) ---\n{_tail(self.diags_path)}\n"
                          f"--- stderr (tail) ---\n{_tail(self.stderr_path)}")
            self._kill_now()
            if "exited" in why and "address already in use" not in self.diags().lower():
                break  # a config or plugin failure: retrying would only repeat it
        raise AtsError("traffic_server did not start:\n" + "\n".join(errors))

    def _wait_ready(self, timeout: float) -> Optional[str]:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while time.monotonic() < deadline:
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is not None:
                return f"traffic_server exited with status {rc}"
            if f"listen on port {self.port}:" in self.diags() or \
                    f"listen to port {self.port} " in self.diags():
                return f"port {self.port} is taken (Address already in use)"
            # only ask once it listens itself: another listener on a clashing port
            # may never answer
            if _listening_pid_owns(self.proc.pid, self.port):
                status = _probe(self.port, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                if status is not None:
                    return None
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        return f"no answer on port {self.port} within {timeout} s"

    def _kill_now(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        with _live_lock:
            _live.discard(self)

    def stop(self, timeout: float = 4.0, wait: bool = True) -> Optional[int]:
        """SIGTERM, then SIGKILL to the process group after TIMEOUT seconds. With
        wait=False the waiting happens in a background thread (teardown need not pay
        ATS's 2-3 s of shutdown); ``join()`` waits for it. Returns the exit status when
        waited for."""
        proc = self.proc
        if proc is None:
            return None
        self.stopped = True  # (its end is not a death for start_ats's teardown)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

        def reap() -> None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            # children left in the group (none expected) go too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            with _live_lock:
                _live.discard(self)

        if wait:
            reap()
            return proc.returncode
        self._reaper = threading.Thread(target=reap, daemon=True)
        self._reaper.start()
        return None

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for a stop(wait=False) to finish."""
        if self._reaper is not None:
            self._reaper.join(timeout)

    def restart(self) -> "AtsServer":
        """Stop, then start again on the same run root (a new port; the cache file and
        diags.log are kept)."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop (waiting) and remove the temporary directory (when it made it)."""
        self.stop()
        self.join()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "AtsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ---- logs ----

    def diags(self) -> str:
        """The text of diags.log so far (plugins' TSNote / TSError / TSWarning)."""
        try:
            with open(self.diags_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def diags_lines(self, pattern: Optional[str] = None) -> List[str]:
        """The lines of diags.log, those matching the regular expression PATTERN when given."""
        lines = self.diags().splitlines()
        if pattern is None:
            return lines
        rx = re.compile(pattern)
        return [line for line in lines if rx.search(line)]

    def wait_diags(self, pattern: str, count: int = 1, timeout: float = 5.0) -> List[str]:
        """The lines matching PATTERN once there are COUNT of them (diags.log is written
        asynchronously), or what there is after TIMEOUT seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.diags_lines(pattern)
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _kill_all() -> None:
    with _live_lock:
        servers = list(_live)
    for s in servers:
        s._kill_now()


atexit.register(_kill_all)


def modules_dir() -> str:
    return MODULES


def plugin_line(path: str, args: Iterable[str] = ()) -> str:
    """A plugin.config line (arguments with spaces are quoted as ATS reads them)."""
    parts = [path] + [f'"{a}"' if (" " in a or not a) else a for a in args]
    return " ".join(parts)
