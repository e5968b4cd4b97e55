"""`me-local service`: rendered units and plists, and install/uninstall/status against a fake machine.

The machine is a :class:`Host` whose home and system root are temporary
directories and whose command runner records commands instead of running them;
systemd's own checker (`systemd-analyze verify`) judges the rendered units.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from me_local.cli import cli
from me_local.service import (
    CommandResult,
    Host,
    find_me_local,
    format_env_file,
    parse_env_file,
    service,
    systemd_word,
    template,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789"
UNIT = "me-local.service"


class FakeRunner:
    """Records every command; answers from `results` (first matching argv prefix), else exit 0."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.results: dict[tuple[str, ...], CommandResult] = {}

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        for prefix, result in self.results.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return result
        return CommandResult(0)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def machine(tmp_path: Path, runner: FakeRunner) -> Host:
    home = tmp_path / "home"
    home.mkdir()
    root = tmp_path / "root"
    (root / "run/systemd/system").mkdir(parents=True)
    runtime = tmp_path / "session-runtime"  # a login session's XDG_RUNTIME_DIR, with the user manager's socket
    (runtime / "systemd").mkdir(parents=True)
    (runtime / "systemd/private").touch()
    return Host(platform="linux", home=home, environ={"XDG_RUNTIME_DIR": str(runtime)}, uid=1000, runner=runner,
                root=root,
                which=lambda name: f"/usr/bin/{name}", executable=find_me_local())


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid models.yaml in a directory whose name needs quoting in a unit file."""
    folder = tmp_path / "my models"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(b"GGUF")
    path = folder / "models.yaml"
    path.write_text("ensembles:\n  default:\n    members:\n      - {name: one, path: tiny.gguf}\n")
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key.txt"
    path.write_text(KEY + "\n")
    return path


def invoke(host: Host, *args: str):
    """`me-local service ARGS` through the real CLI (which turns errors into one line and an exit status)."""
    return CliRunner().invoke(cli, ["service", *args], obj=host, catch_exceptions=False)


def snapshot(top: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p)] = (st.st_mode, p.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def user_unit(host: Host) -> Path:
    return host.home / ".config/systemd/user" / UNIT


def user_env(host: Host) -> Path:
    return host.home / ".config/me-local/service.env"


# --------------------------------------------------------------------------- rendering


def test_user_unit_has_the_paths_and_settings(machine: Host, config: Path) -> None:
    result = invoke(machine, "print", "--systemd", "--config", str(config), "--port", "11500")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    me_local = find_me_local()[0]
    assert f'ExecStart={me_local} --log-level info serve --config "{config}" --port 11500' in lines
    assert f"EnvironmentFile=-{user_env(machine)}" in lines
    for line in ["Type=notify", "NotifyAccess=main", "Restart=on-failure", "TimeoutStartSec=15min",
                 "WatchdogSec=60s", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "PrivateTmp=yes", "WantedBy=default.target"]:
        assert line in lines
    assert not any(line.startswith(("PrivateDevices", "DevicePolicy", "MemoryDenyWriteExecute", "User="))
                   for line in lines)


def test_unit_raises_the_descriptor_limit_and_caps_malloc_arenas(machine: Host, config: Path) -> None:
    result = invoke(machine, "print", "--systemd", "--config", str(config))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "LimitNOFILE=65536" in lines  # systemd's default soft limit (1024) is a few hundred clients
    assert "Environment=MALLOC_ARENA_MAX=2" in lines  # glibc's per-thread arenas grow with each reload


def test_find_me_local_is_this_environments_script(tmp_path: Path) -> None:
    assert find_me_local() == (str(Path(sys.executable).parent / "me-local"),)
    lonely = tmp_path / "python3"
    assert find_me_local(str(lonely), which=lambda _: None) == (str(lonely), "-m", "me_local.cli")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
@pytest.mark.parametrize("scope", ["--user", "--system"])
def test_systemd_analyze_verify_accepts_the_unit(machine: Host, config: Path, tmp_path: Path, scope: str) -> None:
    # An executable whose path needs quoting and specifier/variable escaping: verify checks it exists.
    odd = tmp_path / "bin dir %n $HOME"
    odd.mkdir()
    exe = odd / "me-local"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    machine.executable = (str(exe),)
    result = invoke(machine, "print", "--systemd", scope, "--run-as", "daemon", "--config", str(config),
                    "--writable", str(tmp_path / "out dir"), "--", "--allow-origin", "http://x y")
    assert result.exit_code == 0, result.output
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    unit = unit_dir / UNIT
    unit.write_text(result.output)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    argv = ["systemd-analyze", *(["--user"] if scope == "--user" else []), "verify", str(unit)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    # verify exits 0 on unknown keys and bad values too, only complaining on stderr: demand silence.
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    if scope == "--system":
        assert "User=daemon" in result.output and "After=network.target" in result.output
        assert "WantedBy=multi-user.target" in result.output


def test_systemd_word_escapes_specifiers_variables_and_quotes() -> None:
    assert systemd_word("/usr/bin/me-local") == "/usr/bin/me-local"
    assert systemd_word("a b") == '"a b"'
    assert systemd_word('say "hi" \\ 100%', exec_line=True) == '"say \\"hi\\" \\\\ 100%%"'
    assert systemd_word("$HOME", exec_line=True) == "$$HOME"
    assert systemd_word("$HOME") == "$HOME"


def test_launchd_plist_parses_with_the_expected_keys(machine: Host, config: Path) -> None:
    result = invoke(machine, "print", "--launchd", "--config", str(config), "--port", "11500")
    assert result.exit_code == 0, result.output
    plist = plistlib.loads(result.output.encode())
    assert plist["Label"] == "me-local"
    assert plist["ProgramArguments"] == [*find_me_local(), "--log-level", "info", "serve", "--config", str(config),
                                         "--port", "11500"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    log = str(machine.home / "Library/Logs/me-local/me-local.log")
    assert plist["StandardErrorPath"] == plist["StandardOutPath"] == log
    assert "EnvironmentVariables" not in plist and "UserName" not in plist


def test_templates_ship_as_package_data() -> None:
    for name in ("me-local.service.in", "me-local.plist.in"):
        assert template(name) == (ROOT / "service" / name).read_text()
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["me_local"]
    assert "service/templates/*" in patterns, (
        'add "service/templates/*" to [tool.setuptools.package-data] me_local in pyproject.toml, '
        "or a wheel ships without the unit templates"
    )


def test_env_file_round_trip() -> None:
    env = {"ME_LOCAL_API_KEY": KEY, "QUOTED": "it's $HOME \"x\" \\ `y`", "EMPTY": ""}
    assert parse_env_file(format_env_file(env)) == env


# --------------------------------------------------------------------------- install / uninstall (systemd)


def test_install_user_writes_files_with_modes_and_runs_systemctl(
    machine: Host, runner: FakeRunner, config: Path, key_file: Path
) -> None:
    result = invoke(machine, "install", "--config", str(config), "--port", "11500",
                    "--api-key-file", str(key_file))
    assert result.exit_code == 0, result.output
    assert runner.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", UNIT],
    ]
    unit, env = user_unit(machine), user_env(machine)
    assert mode(unit) == 0o644 and mode(env) == 0o600 and mode(env.parent) == 0o700
    printed = invoke(machine, "print", "--systemd", "--config", str(config), "--port", "11500").output
    assert unit.read_text() == printed
    assert f"ME_LOCAL_API_KEY='{KEY}'" in env.read_text().splitlines()
    assert KEY not in result.output
    assert "journalctl --user -u me-local -f" in result.output
    assert "loginctl enable-linger" in result.output


def test_reinstall_keeps_the_key_merges_env_and_restarts(
    machine: Host, runner: FakeRunner, config: Path, key_file: Path
) -> None:
    assert invoke(machine, "install", "--config", str(config), "--api-key-file", str(key_file)).exit_code == 0
    runner.calls.clear()
    result = invoke(machine, "install", "--config", str(config), "--port", "9999", "--env", "CUDA_VISIBLE_DEVICES=1")
    assert result.exit_code == 0, result.output
    assert runner.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", UNIT],
        ["systemctl", "--user", "restart", UNIT],
    ]
    assert parse_env_file(user_env(machine).read_text()) == {"ME_LOCAL_API_KEY": KEY, "CUDA_VISIBLE_DEVICES": "1"}
    assert "--port 9999" in user_unit(machine).read_text()


def test_install_honours_xdg_config_home_and_no_wait(machine: Host, runner: FakeRunner, config: Path,
                                                      tmp_path: Path) -> None:
    machine.environ = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    result = invoke(machine, "install", "--config", str(config), "--no-wait")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "xdg/systemd/user" / UNIT).is_file()
    assert (tmp_path / "xdg/me-local/service.env").is_file()
    assert not (machine.home / ".config").exists()
    assert runner.calls[-1] == ["systemctl", "--user", "enable", "--now", "--no-block", UNIT]


def test_dry_run_writes_and_runs_nothing(machine: Host, runner: FakeRunner, config: Path, key_file: Path,
                                         tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = invoke(machine, "install", "--dry-run", "--config", str(config), "--api-key-file", str(key_file),
                    "--", "--log-prompts")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before
    assert runner.calls == []
    assert f"--- write {user_unit(machine)} (mode 0644) ---" in result.output
    assert f"--- write {user_env(machine)} (mode 0600) ---" in result.output
    assert "ME_LOCAL_API_KEY='<redacted>'" in result.output and KEY not in result.output
    assert "$ systemctl --user enable --now me-local.service" in result.output
    assert f'serve --config "{config}" --log-prompts' in result.output


def test_uninstall_disables_and_removes(machine: Host, runner: FakeRunner, config: Path, key_file: Path,
                                        tmp_path: Path) -> None:
    invoke(machine, "install", "--config", str(config), "--api-key-file", str(key_file))
    runner.calls.clear()
    before = snapshot(tmp_path)
    dry = invoke(machine, "uninstall", "--dry-run")
    assert dry.exit_code == 0 and snapshot(tmp_path) == before and runner.calls == []
    result = invoke(machine, "uninstall")
    assert result.exit_code == 0, result.output
    assert runner.calls == [
        ["systemctl", "--user", "disable", "--now", UNIT],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "reset-failed", UNIT],
    ]
    assert not user_unit(machine).exists() and not user_env(machine).exists()
    again = invoke(machine, "uninstall")
    assert again.exit_code == 0 and "not installed" in again.output


def test_uninstall_keep_env(machine: Host, config: Path, key_file: Path) -> None:
    invoke(machine, "install", "--config", str(config), "--api-key-file", str(key_file))
    assert invoke(machine, "uninstall", "--keep-env").exit_code == 0
    assert not user_unit(machine).exists() and user_env(machine).is_file()


def test_system_install_needs_root(machine: Host, runner: FakeRunner, config: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = invoke(machine, "install", "--system", "--config", str(config))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "--system needs root" in result.output and "sudo " in result.output
    dry = invoke(machine, "install", "--system", "--dry-run", "--config", str(config))
    assert dry.exit_code == 0 and "# would fail: --system needs root" in dry.output
    assert snapshot(tmp_path) == before and runner.calls == []


def test_system_install_as_root(machine: Host, runner: FakeRunner, config: Path, key_file: Path) -> None:
    machine.uid = 0
    missing = invoke(machine, "install", "--system", "--config", str(config))
    assert missing.exit_code == 2 and "--run-as USER" in missing.output
    machine.environ = {"SUDO_USER": "daemon"}
    result = invoke(machine, "install", "--system", "--config", str(config), "--api-key-file", str(key_file))
    assert result.exit_code == 0, result.output
    unit = machine.root / "etc/systemd/system" / UNIT
    env = machine.root / "etc/me-local/service.env"
    assert mode(unit) == 0o644 and mode(env) == 0o600
    text = unit.read_text()
    assert "User=daemon" in text.splitlines() and f"EnvironmentFile=-{env}" in text.splitlines()
    assert "WantedBy=multi-user.target" in text
    assert runner.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT]]
    assert "enable-linger" not in result.output


def test_unknown_run_as_user(machine: Host, config: Path) -> None:
    machine.uid = 0
    result = invoke(machine, "install", "--system", "--run-as", "no-such-user-xyz", "--config", str(config))
    assert result.exit_code == 2 and "no user 'no-such-user-xyz'" in result.output


def test_missing_systemctl_or_systemd(machine: Host, runner: FakeRunner, config: Path) -> None:
    machine.which = lambda name: None
    result = invoke(machine, "install", "--config", str(config))
    assert result.exit_code == 2 and "systemctl not found" in result.output
    machine.which = lambda name: f"/usr/bin/{name}"
    (machine.root / "run/systemd/system").rmdir()
    result = invoke(machine, "install", "--config", str(config))
    assert result.exit_code == 2 and "systemd is not running" in result.output
    assert runner.calls == [] and not user_unit(machine).exists()


def test_failed_start_names_the_command_and_the_logs(machine: Host, runner: FakeRunner, config: Path) -> None:
    runner.results[("systemctl", "--user", "enable")] = CommandResult(
        1, "", "Job for me-local.service failed because the control process exited with error code.\n")
    result = invoke(machine, "install", "--config", str(config))
    assert result.exit_code == 1
    assert "`systemctl --user enable --now me-local.service` failed: Job for me-local.service failed" in result.output
    assert "journalctl --user -u me-local -e" in result.output


def test_unreachable_user_manager_says_how_to_fix_it(machine: Host, runner: FakeRunner, config: Path) -> None:
    machine.environ = {}  # as under sudo: no XDG_RUNTIME_DIR, so systemctl --user finds no manager
    runner.results[("systemctl", "--user", "daemon-reload")] = CommandResult(
        1, "", "Failed to connect to bus: No medium found\n")
    result = invoke(machine, "install", "--config", str(config))
    assert result.exit_code == 1 and "cannot reach your systemd user manager" in result.output
    assert runner.calls == [["systemctl", "--user", "daemon-reload"]]


def test_no_user_manager_is_told_by_the_machine_not_by_the_message(machine: Host, runner: FakeRunner,
                                                                   tmp_path: Path) -> None:
    """XDG_RUNTIME_DIR names a directory where no user manager listens (as under `su`: the first user's);
    the hint follows from that, whatever systemctl printed."""
    other = tmp_path / "other-runtime"
    other.mkdir()
    machine.environ = {"XDG_RUNTIME_DIR": str(other)}
    runner.results[("systemctl", "--user", "show")] = CommandResult(1)
    user_unit(machine).parent.mkdir(parents=True)
    user_unit(machine).write_text("[Unit]\n")
    result = invoke(machine, "status")
    assert result.exit_code == 1
    assert "`systemctl --user show me-local.service" in result.output and "failed: exit status 1" in result.output
    assert "cannot reach your systemd user manager: run this from a regular login session" in result.output


def test_sandbox_follows_user_namespaces(machine: Host, config: Path) -> None:
    knob = machine.root / "proc/sys/kernel/apparmor_restrict_unprivileged_userns"
    knob.parent.mkdir(parents=True)
    knob.write_text("1\n")
    lines = invoke(machine, "print", "--systemd", "--config", str(config)).output.splitlines()
    assert "ProtectSystem=strict" not in lines and "PrivateTmp=yes" not in lines
    assert "NoNewPrivileges=yes" in lines
    assert any(line.startswith("# ProtectSystem=strict and PrivateTmp=yes are off") for line in lines)
    forced = invoke(machine, "print", "--systemd", "--sandbox", "--config", str(config)).output.splitlines()
    assert "ProtectSystem=strict" in forced
    system = invoke(machine, "print", "--systemd", "--system", "--run-as", "root", "--config", str(config))
    assert "ProtectSystem=strict" in system.output.splitlines()


def test_bad_config_or_env_is_refused_before_anything_is_written(machine: Host, runner: FakeRunner,
                                                                  tmp_path: Path, config: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ensembles: [\n")
    result = invoke(machine, "install", "--config", str(bad))
    assert result.exit_code == 2 and str(bad) in result.output and "invalid YAML" in result.output
    result = invoke(machine, "install", "--config", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2 and "not found" in result.output
    result = invoke(machine, "install", "--config", str(config), "--env", "NOT AN ASSIGNMENT")
    assert result.exit_code == 2 and "NAME=VALUE" in result.output
    result = invoke(machine, "install", "--config", str(config), "--env", "A=line\nbreak")
    assert result.exit_code == 2 and "line break" in result.output
    assert runner.calls == [] and not user_unit(machine).exists() and not user_env(machine).exists()


def test_unsupported_platform(machine: Host, config: Path) -> None:
    machine.platform = "win32"
    result = invoke(machine, "install", "--config", str(config))
    assert result.exit_code == 2 and "supports Linux (systemd) and macOS (launchd)" in result.output


# --------------------------------------------------------------------------- status


def test_status_reports_systemd_state(machine: Host, runner: FakeRunner, config: Path) -> None:
    not_installed = invoke(machine, "status")
    assert not_installed.exit_code == 3 and "not installed" in not_installed.output
    invoke(machine, "install", "--config", str(config))
    runner.results[("systemctl", "--user", "show")] = CommandResult(0, (
        "LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\nMainPID=4242\n"
        "StatusText=serving default on 127.0.0.1:11500\nNRestarts=0\n"))
    result = invoke(machine, "status")
    assert result.exit_code == 0, result.output
    assert "state:  active (running), enabled, pid 4242" in result.output
    assert "status: serving default on 127.0.0.1:11500" in result.output
    assert runner.calls[-1][:4] == ["systemctl", "--user", "show", UNIT]
    runner.results[("systemctl", "--user", "show")] = CommandResult(0, (
        "LoadState=loaded\nActiveState=failed\nSubState=failed\nUnitFileState=enabled\nMainPID=0\nNRestarts=5\n"))
    failed = invoke(machine, "status")
    assert failed.exit_code == 3 and "failed (failed), enabled, restarted 5 times" in failed.output


def test_service_group_is_the_clis_lazy_command() -> None:
    assert cli.get_command(None, "service") is service  # type: ignore[arg-type]


# --------------------------------------------------------------------------- launchd


@pytest.fixture
def mac(machine: Host) -> Host:
    machine.platform = "darwin"
    machine.uid = 501
    return machine


def test_launchd_install_reinstall_status_uninstall(mac: Host, runner: FakeRunner, config: Path,
                                                     key_file: Path) -> None:
    result = invoke(mac, "install", "--config", str(config), "--port", "11500", "--api-key-file", str(key_file))
    assert result.exit_code == 0, result.output
    plist_path = mac.home / "Library/LaunchAgents/me-local.plist"
    assert mode(plist_path) == 0o600
    assert (mac.home / "Library/Logs/me-local").is_dir()
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["EnvironmentVariables"] == {"ME_LOCAL_API_KEY": KEY}
    assert plist["ProgramArguments"][-2:] == ["--port", "11500"]
    assert KEY not in result.output
    assert runner.calls == [
        ["launchctl", "enable", "gui/501/me-local"],
        ["launchctl", "bootstrap", "gui/501", str(plist_path)],
    ]

    runner.calls.clear()
    assert invoke(mac, "install", "--config", str(config), "--port", "11501").exit_code == 0
    assert runner.calls[0] == ["launchctl", "bootout", "gui/501/me-local"]
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["EnvironmentVariables"] == {"ME_LOCAL_API_KEY": KEY}
    assert plist["ProgramArguments"][-2:] == ["--port", "11501"]

    runner.results[("launchctl", "print")] = CommandResult(0, "gui/501/me-local = {\n\tstate = running\n\tpid = 77\n")
    status = invoke(mac, "status")
    assert status.exit_code == 0 and "state:  running, pid 77" in status.output

    runner.calls.clear()
    assert invoke(mac, "uninstall").exit_code == 0
    assert runner.calls == [["launchctl", "bootout", "gui/501/me-local"]]
    assert not plist_path.exists() and (mac.home / "Library/Logs/me-local").is_dir()


def test_launchd_dry_run_redacts_and_writes_nothing(mac: Host, runner: FakeRunner, config: Path, key_file: Path,
                                                    tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = invoke(mac, "install", "--dry-run", "--config", str(config), "--api-key-file", str(key_file))
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before and runner.calls == []
    assert "<string>&lt;redacted&gt;</string>" in result.output and KEY not in result.output
    assert "$ launchctl bootstrap gui/501" in result.output
