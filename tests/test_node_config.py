"""The node's settings: defaults < config file < environment < flags; mistakes are clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from node.config import DEFAULT_HTTP_BIND, DEFAULT_P2P_LISTEN, NodeConfig, config_template, load_config
from node.errors import ConfigError


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config({}, {})
    assert config.data_dir == tmp_path / "data"
    assert config.p2p and config.http and config.p2p_listen == DEFAULT_P2P_LISTEN
    assert config.http_bind == DEFAULT_HTTP_BIND and config.metrics_bind is None
    assert config.control_socket == tmp_path / "data" / "control.sock"
    assert config.log_level == "info" and config.relays == () and not config.relay_service


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "config.toml").write_text(
        '[node]\nname = "from-file"\nlog_level = "debug"\n'
        '[http]\nbind = "127.0.0.1:1"\n[p2p]\nlisten = ["/ip4/127.0.0.1/tcp/2"]\nrelay_service = true\n'
    )
    env = {"EIDETICA_DATA_DIR": str(data), "EIDETICA_HTTP_BIND": "127.0.0.1:3", "EIDETICA_NAME": "from-env"}
    config = load_config({"name": "from-flag"}, env)
    assert config.config_file == data / "config.toml"  # found in the data directory the environment names
    assert config.name == "from-flag"
    assert config.http_bind == "127.0.0.1:3"
    assert config.p2p_listen == ("/ip4/127.0.0.1/tcp/2",) and config.relay_service
    assert config.log_level == "debug"


def test_environment_lists_and_booleans(tmp_path: Path) -> None:
    env = {
        "EIDETICA_DATA_DIR": str(tmp_path),
        "EIDETICA_P2P_LISTEN": "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2",
        "EIDETICA_HTTP": "off",
        "EIDETICA_RELAYS": "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWxyz",
        "EIDETICA_METRICS_BIND": "127.0.0.1:9100",
    }
    config = load_config({"p2p_listen": None}, env)
    assert config.p2p_listen == ("/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2")
    assert config.http is False and config.relays == ("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWxyz",)
    assert config.metrics_bind == "127.0.0.1:9100"


def test_explicit_config_file_may_move_the_data_directory(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'data_dir = "{tmp_path / "elsewhere"}"\n')
    assert load_config({"config": str(path)}, {}).data_dir == tmp_path / "elsewhere"
    assert load_config({}, {"EIDETICA_CONFIG": str(path)}).data_dir == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[p2p]\nlisen = []\n", r"unknown setting 'p2p.lisen'"),
        ("[http]\nenabled = 3\n", r"http.enabled must be true or false, not 3"),
        ('[node]\nlog_level = "loud"\n', r"must be one of debug, info, warning, error"),
        ("[p2p\n", r"is not valid TOML"),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config({"config": str(path)}, {})


def test_bad_environment_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^environment variable EIDETICA_P2P must be true or false, not 'maybe'$"):
        load_config({}, {"EIDETICA_P2P": "maybe", "EIDETICA_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"^config file .*nope.toml does not exist$"):
        load_config({"config": str(tmp_path / "nope.toml")}, {})


def test_template_is_valid_toml_with_every_setting_commented() -> None:
    text = config_template()
    assert all(section == {} for section in tomllib.loads(text).values())  # all commented: defaults apply
    uncommented = [
        line.removeprefix("# ").split("    # env")[0] if " = " in line else line for line in text.splitlines()
    ]
    document = tomllib.loads("\n".join(uncommented))
    assert document["p2p"]["listen"] == list(NodeConfig().p2p_listen)
    assert document["http"]["bind"] == NodeConfig().http_bind


def test_signature_processes_auto_a_count_or_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert load_config({}, {}).signature_process_count() == 4
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert load_config({}, {}).signature_process_count() == 0  # one core: threads only
    assert load_config({"signature_processes": "0"}, {}).signature_process_count() == 0
    assert load_config({}, {"EIDETICA_SIGNATURE_PROCESSES": " 3 "}).signature_process_count() == 3
    (tmp_path / "c.toml").write_text("[node]\nsignature_processes = 2\n")
    assert load_config({"config": str(tmp_path / "c.toml")}, {}).signature_process_count() == 2
    for bad in ("-1", "two", "1.5", "65"):
        with pytest.raises(ConfigError, match=r"--signature-processes must be auto or a whole number"):
            load_config({"signature_processes": bad}, {})


def test_hole_punching_can_be_turned_off_by_flag_environment_or_file(tmp_path: Path) -> None:
    assert load_config({}, {}).hole_punching
    assert not load_config({"hole_punching": False}, {}).hole_punching
    assert not load_config({}, {"EIDETICA_HOLE_PUNCHING": "off"}).hole_punching
    (tmp_path / "c.toml").write_text("[p2p]\nhole_punching = false\n")
    assert not load_config({"config": str(tmp_path / "c.toml")}, {}).hole_punching


def test_announce_from_flag_environment_or_file_is_checked_as_multiaddrs(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[p2p]\nannounce = ["/dns4/a.example/tcp/4001", "/ip4/203.0.113.7/tcp/4001"]\n')
    assert load_config({"config": str(path)}, {}).announce == ("/dns4/a.example/tcp/4001", "/ip4/203.0.113.7/tcp/4001")
    env = {"EIDETICA_ANNOUNCE": "/ip4/203.0.113.8/tcp/1, /ip6/2001:db8::1/tcp/2", "EIDETICA_DATA_DIR": str(tmp_path)}
    assert load_config({}, env).announce == ("/ip4/203.0.113.8/tcp/1", "/ip6/2001:db8::1/tcp/2")
    assert load_config({"announce": ["/ip4/203.0.113.9/tcp/3"]}, env).announce == ("/ip4/203.0.113.9/tcp/3",)
    assert NodeConfig().announce == ()
    path.write_text('[p2p]\nannounce = ["/ip4/203.0.113.7/tcp/99999"]\n')
    with pytest.raises(
        ConfigError, match=r"node.toml: p2p.announce must be multiaddrs like .*'/ip4/203.0.113.7/tcp/99999' is not one"
    ):
        load_config({"config": str(path)}, {})
    with pytest.raises(ConfigError, match=r"^environment variable EIDETICA_ANNOUNCE must be multiaddrs like"):
        load_config({}, {"EIDETICA_ANNOUNCE": "nope", "EIDETICA_DATA_DIR": str(tmp_path)})
    assert "# announce = []    # env EIDETICA_ANNOUNCE" in config_template()
