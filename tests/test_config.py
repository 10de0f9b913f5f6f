"""The service configuration on pydantic: strict types, one-line errors naming the key, `onevlm config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from onevlm.cli import main
from onevlm.net.config import ConfigError, config_schema, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "onevlm-service.example.yaml"


def problem(change: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_config({"spool_dir": str(tmp_path / "spool"), **change}, source="site.yaml")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("site.yaml: ")
    return message


@pytest.mark.parametrize(("change", "expected"), [
    # each of these was silently misread before: "false" became True, None became "None", any list a username
    ({"listener": {"tls": {"require": "false"}}}, "site.yaml: listener.tls.require: 'false' must be true or false"),
    ({"listener": {"allowed_addresses": ["10.0.0.0/8", "not-an-ip"]}},
     "site.yaml: listener.allowed_addresses[1]: 'not-an-ip' is not an IP address or network"),
    ({"listener": {"host": None}}, "site.yaml: listener.host: None must be a non-empty string"),
    ({"intake": {"orthanc": "http://127.0.0.1:8042", "username": ["a"]}},
     "site.yaml: intake.username: ['a'] must be a non-empty string"),
    ({"dashboard": {"show_patient_ids": "no"}}, "site.yaml: dashboard.show_patient_ids: 'no' must be true or false"),
    ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": True}]},
     "site.yaml: destinations[0].port: True is not a TCP port (1-65535)"),
])
def test_misreads_are_errors_naming_the_key(tmp_path, change, expected):
    assert problem(change, tmp_path).startswith(expected)


@pytest.mark.parametrize(("change", "where"), [
    ({"listenr": {}}, "listenr"),
    ({"listener": {"tls": {"verify": True}}}, "listener.tls.verify"),
    ({"destinations": [{"name": "a", "dicomweb": "http://x/dicom-web", "secret": "s"}]}, "destinations[0].secret"),
    ({"pipeline": {"specialty": {"base_model_dir": "m", "adapters": ["a"], "extra": 1}}}, "pipeline.specialty.extra"),
    ({"dashboard": {"token": "abc"}}, "dashboard.token"),
])
def test_unknown_keys_are_refused(tmp_path, change, where):
    assert f"site.yaml: {where}: is not a known setting" in problem(change, tmp_path)


def test_several_problems_are_counted_on_the_one_line(tmp_path):
    message = problem({"listener": {"port": 0, "max_pdu_bytes": 0}, "workers": 0}, tmp_path)
    assert message.startswith("site.yaml: listener.port: 0 is not a TCP port") and message.endswith("(and 2 more)")


def test_defaults_and_empty_sections(tmp_path):
    config = parse_config({"spool_dir": "spool", "listener": None, "grouping": None, "dashboard": None}, base=tmp_path)
    assert config.spool_dir == tmp_path / "spool"
    assert config.listener.host == "127.0.0.1" and config.listener.port == 11112 and config.listener.tls.require is False
    assert config.group_by == "study" and config.idle_seconds == 5.0 and config.pipeline.backend == "embedded"
    assert config.retry_max_seconds == 300.0 and config.max_export_attempts == 20 and config.status_port is None
    assert config.disk.min_free_bytes == 2 * 1024**3 and config.intake is None and config.dashboard.loopback
    allowed = parse_config({"spool_dir": "s", "listener": {"allowed_addresses": ["10.1.2.3", "fd00::/8"]}})
    assert allowed.listener.allowed_addresses == ("10.1.2.3", "fd00::/8")


def test_config_check(tmp_path, capsys):
    assert main(["config", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and len(out.splitlines()) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("spool_dir: spool\nlistener:\n  host: null\n  tls: {require: 'false'}\n")
    assert main(["config", "check", str(broken)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken}: listener.host: ")
    assert lines[0].endswith("(and 1 more)")


def test_config_schema(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == config_schema()
    assert {"spool_dir", "listener", "destinations"} <= set(schema["properties"])
    assert schema["required"] == ["spool_dir"] and schema["additionalProperties"] is False
    example = yaml.safe_load(EXAMPLE.read_text())
    try:
        import jsonschema
    except ImportError:  # not installed: check the example's keys against the schema's by hand
        assert set(example) <= set(schema["properties"])
        listener = schema["$defs"][schema["properties"]["listener"]["$ref"].rsplit("/", 1)[-1]]
        assert set(example["listener"]) <= set(listener["properties"])
        assert listener["properties"]["port"]["maximum"] == 65535
        return
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "listener": {"tls": {"require": "false"}}}, schema)


def test_the_example_loads(tmp_path):
    config = load_config(EXAMPLE)
    assert config.listener.allowed_addresses == ("127.0.0.1/32",) and config.status_port == 8089
