"""The deployment examples under ``deploy/`` stay consistent with each other and with the app (fast).

Research use only: not for clinical use.

What is checked here is what can be checked without a Workflow Manager, an Informatics Gateway, Argo or Docker:
the files parse; the workflow obeys the rules the Workflow Manager's own validator enforces (task ids, task types,
destinations, Argo arguments); its conditions read only top-level scalar keys of the ``metadata.json`` the app writes
(the Argo plugin loads that file as a flat dictionary); the MAP command, paths, environment and resources match
``Dockerfile`` and ``app.yaml``; the Informatics Gateway bodies name the workflow's AE title, origin and destinations;
and ``register.sh`` POSTs the right bodies to the right endpoints (against a stand-in ``curl``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from onevlm.reports.routing_metadata import build_metadata, series_entry

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
WORKFLOW_FILE = DEPLOY / "workflow-manager" / "onevlm-router-workflow.json"
ARGO_TEMPLATE_FILE = DEPLOY / "workflow-manager" / "argo-workflow-template.json"
IG = DEPLOY / "informatics-gateway"
MAP = DEPLOY / "map"

ENTRYPOINT = ["python", "-m", "apps.router_app", "-i", "/var/holoscan/input", "-o", "/var/holoscan/output"]

# From the Workflow Manager's source (ValidationConstants.ValidTaskTypes, ArgoParameters.VaildParameters).
WM_TASK_TYPES = {"argo", "aide_clinical_review", "router", "export", "docker", "email", "remote_app_execution",
                 "export_hl7"}
WM_ARGO_ARGS = {"namespace", "server_url", "allow_insecure", "workflow_template_name", "timeoutSeconds", "apiToken",
                "endpoint", "username", "password", "exchange", "virtualHost", "resources", "parameters", "priority",
                "cpu", "memory", "gpu_required"}
PARAMETER = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def _load(path: Path):
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"{path}: duplicate keys {sorted(dupes)}"
        return dict(pairs)

    return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)


@pytest.fixture(scope="module")
def workflow() -> dict:
    return _load(WORKFLOW_FILE)


@pytest.fixture(scope="module")
def tasks(workflow) -> dict[str, dict]:
    return {t["id"]: t for t in workflow["tasks"]}


@pytest.fixture(scope="module")
def app_yaml() -> dict:
    return yaml.safe_load((REPO / "app.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dockerfile() -> dict:
    """ENTRYPOINT, WORKDIR and ENV of the repository's Dockerfile."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    parsed: dict = {"env": {}}
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction == "ENTRYPOINT":
            parsed["entrypoint"] = json.loads(rest)
        elif instruction == "WORKDIR":
            parsed["workdir"] = rest.strip()
        elif instruction == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                parsed["env"][key] = value
    return parsed


def _references(text: str) -> list[str]:
    return PARAMETER.findall(text)


def _all_conditions(workflow) -> list[str]:
    return [c for t in workflow["tasks"] for d in t.get("task_destinations", []) for c in d.get("conditions", [])]


# --- every file ------------------------------------------------------------------------------------------------------


def test_every_json_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.json"))
    assert len(files) >= 8, files
    for path in files:
        assert isinstance(_load(path), dict), path


# --- the Workflow Manager workflow -----------------------------------------------------------------------------------


def test_workflow_top_level_follows_the_spec(workflow):
    assert set(workflow) <= {"name", "version", "description", "informatics_gateway", "tasks"}
    assert workflow["name"] and len(workflow["name"]) <= 15
    assert workflow["version"]
    assert len(workflow["description"]) <= 200
    assert "research use only" in workflow["description"]
    gateway = workflow["informatics_gateway"]
    assert 0 < len(gateway["ae_title"]) <= 15
    assert gateway["export_destinations"]
    assert workflow["tasks"]


def test_task_ids_types_and_common_fields(workflow):
    ids = [t["id"] for t in workflow["tasks"]]
    assert len(ids) == len(set(ids)), "duplicate task id"
    for task in workflow["tasks"]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,50}", task["id"]), task["id"]
        assert task["type"] in WM_TASK_TYPES, task["type"]
        assert task.get("description"), task["id"]
        if task["type"] != "router":
            inputs = task["artifacts"]["input"]
            assert inputs and all(a["name"] and a["value"] for a in inputs), task["id"]
        outputs = task.get("artifacts", {}).get("output", [])
        assert len({a["name"] for a in outputs}) == len(outputs), task["id"]


def test_task_destinations_name_existing_tasks_without_converging(workflow, tasks):
    first = workflow["tasks"][0]["id"]
    targets = [d["name"] for t in workflow["tasks"] for d in t.get("task_destinations", [])]
    assert set(targets) <= set(tasks), f"unknown task destinations: {set(targets) - set(tasks)}"
    assert first not in targets, "a task destination points back at the first task"
    assert len(targets) == len(set(targets)), "converging task destinations"
    assert set(tasks) - {first} == set(targets), "unreferenced tasks"


def test_the_first_task_runs_the_map_on_the_received_dicom(workflow):
    router = workflow["tasks"][0]
    assert router["id"] == "router" and router["type"] == "argo"
    assert [a["value"] for a in router["artifacts"]["input"]] == ["{{ context.input.dicom }}"]
    assert router["task_destinations"] == [{"name": "router_result"}]


def test_argo_task_arguments_are_ones_the_validator_accepts(workflow, app_yaml):
    for task in (t for t in workflow["tasks"] if t["type"] == "argo"):
        args = task["args"]
        assert args.get("workflow_template_name")
        assert set(args) <= WM_ARGO_ARGS, set(args) - WM_ARGO_ARGS
        assert all(isinstance(v, str) for v in args.values()), "task args are a string dictionary"
        assert float(args["cpu"]).is_integer() and float(args["cpu"]) >= 1
        assert args["gpu_required"] in {"true", "false"}
        assert args["cpu"] == str(app_yaml["resources"]["cpu"])
        assert args["memory"] == app_yaml["resources"]["memory"]
        assert args["gpu_required"] == str(app_yaml["resources"]["gpu"] > 0).lower()


def test_export_destinations_are_declared_and_used(workflow):
    declared = set(workflow["informatics_gateway"]["export_destinations"])
    used = set()
    for task in workflow["tasks"]:
        names = [d["name"] for d in task.get("export_destinations", [])]
        assert len(names) == len(set(names)), task["id"]
        if task["type"] == "export":
            assert names, f"export task {task['id']} has no destination"
            assert not task["artifacts"].get("output"), "export tasks have no output artifacts"
        assert set(names) <= declared, f"{task['id']} exports to undeclared {set(names) - declared}"
        used |= set(names)
    assert used == declared, f"declared but never used: {declared - used}"


def test_context_references_name_existing_tasks_and_artifacts(workflow, tasks):
    texts = _all_conditions(workflow) + [a["value"] for t in workflow["tasks"]
                                         for a in t.get("artifacts", {}).get("input", [])]
    seen = 0
    for text in texts:
        for ref in _references(text):
            parts = ref.split(".")
            if parts[:2] == ["context", "input"]:
                assert ref == "context.input.dicom", ref
                continue
            assert parts[:2] == ["context", "executions"], ref
            task = tasks[parts[2]]
            if parts[3] == "artifacts":
                assert parts[4] in {a["name"] for a in task["artifacts"]["output"]}, ref
            elif parts[3] == "result":
                # Only the Argo plugin fills `result`, from the metadata.json it finds in the task's output.
                assert task["type"] == "argo" and len(parts) == 5, ref
            seen += 1
    assert seen >= 5


def _metadata(routed: int, errors: int, skipped: int = 0, reviews: int = 0, sets: int = 0) -> dict:
    decisions = []
    for outcome, count, cards in (("routed", routed, ["MODEL_01"]), ("routed-set", sets, ["MODEL_01", "MODEL_02"]),
                                  ("review", reviews, []), ("failed", errors, [])):
        decisions += [{"outcome": outcome, "cards": cards, "confidence": 0.8 if cards else None,
                       "model_card_id": cards[0] if outcome == "routed" else None,
                       "error": "boom" if outcome == "failed" else None, "stages": []}] * count
    entries = [series_entry(d, study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{i}", dicom_modality="CT")
               for i, d in enumerate(decisions)]
    entries += [series_entry(None, study_instance_uid="1.2.3", series_instance_uid=f"1.2.4.{i}", dicom_modality="SR",
                             skipped="not an image") for i in range(skipped)]
    return build_metadata(entries)


def _evaluate(condition: str, result: dict) -> bool:
    """The subset of the Workflow Manager's conditional language this workflow uses: parameters are replaced by
    the quoted string value (as its parser does), then `'a' OP 'b'` clauses joined by AND are compared as numbers."""
    def value(match):
        parts = match.group(1).split(".")
        raw = result.get(parts[4])
        assert raw is not None and not isinstance(raw, (list, dict)), f"{parts[4]} is not a top-level scalar"
        return f"'{raw}'"

    resolved = PARAMETER.sub(value, condition)
    outcome = True
    for clause in resolved.split(" AND "):
        left, op, right = re.fullmatch(r"'([^']*)' (==|!=|>=|<=|>|<) '([^']*)'", clause.strip()).groups()
        try:
            a, b = float(left), float(right)
        except ValueError:  # booleans and words: `==` compares strings ignoring case
            assert op in ("==", "!="), clause
            a, b = left.lower(), right.lower()
        outcome &= {"==": a == b, "!=": a != b, ">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[op]
    return outcome


@pytest.mark.parametrize(("routed", "errors", "skipped", "reviews", "sets", "expected"), [
    (2, 0, 1, 0, 0, {"export-sr-pacs"}),
    (0, 0, 0, 0, 2, {"export-sr-pacs"}),
    (1, 1, 0, 0, 0, {"export-sr-review"}),
    (1, 0, 0, 1, 1, {"export-sr-review"}),
    (0, 0, 0, 2, 0, {"export-sr-review"}),
    (0, 0, 3, 0, 0, set()),
    (0, 2, 0, 0, 0, {"export-sr-review"}),
])
def test_router_result_branches_on_metadata_json(workflow, tasks, routed, errors, skipped, reviews, sets, expected):
    result = _metadata(routed, errors, skipped, reviews, sets)
    assert result["routed"] == routed and result["errors"] == errors and result["reviews"] == reviews
    assert result["needs_review"] is bool(reviews or errors)
    chosen = {d["name"] for d in tasks["router_result"]["task_destinations"]
              if all(_evaluate(c, result) for c in d["conditions"])}
    assert chosen == expected


def test_exports_take_the_routers_output_folder(tasks):
    for name in ("export-sr-pacs", "export-sr-review"):
        values = [a["value"] for a in tasks[name]["artifacts"]["input"]]
        assert values == ["{{ context.executions.router.artifacts.output }}"]


# --- the Argo WorkflowTemplate behind the router task ----------------------------------------------------------------


def test_argo_template_runs_the_image_entrypoint(tasks, dockerfile, app_yaml):
    body = _load(ARGO_TEMPLATE_FILE)
    template = body["template"]
    assert template["metadata"]["name"] == tasks["router"]["args"]["workflow_template_name"]
    assert template["metadata"]["namespace"] == body["Namespace"] == tasks["router"]["args"]["namespace"]
    main = {t["name"]: t for t in template["spec"]["templates"]}[template["spec"]["entrypoint"]]
    container = main["container"]
    assert container["command"] == dockerfile["entrypoint"] == ENTRYPOINT
    assert container["workingDir"] == dockerfile["workdir"]
    image, _, tag = container["image"].rpartition(":")
    assert image.rsplit("/", 1)[-1] == "onevlm-router" and tag == app_yaml["application"]["version"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {k: v for k, v in dockerfile["env"].items() if k in env}
    assert container["resources"]["requests"] == {"cpu": str(app_yaml["resources"]["cpu"]),
                                                  "memory": app_yaml["resources"]["memory"]}
    # Artifact names must equal the workflow task's, so the plugin can map them to its storage.
    inputs = {a["name"]: a["path"] for a in main["inputs"]["artifacts"]}
    outputs = {a["name"]: a["path"] for a in main["outputs"]["artifacts"]}
    assert set(inputs) == {a["name"] for a in tasks["router"]["artifacts"]["input"]}
    assert set(outputs) == {a["name"] for a in tasks["router"]["artifacts"]["output"]}
    assert list(inputs.values()) == [dockerfile["env"]["HOLOSCAN_INPUT_PATH"]]
    assert list(outputs.values()) == [dockerfile["env"]["HOLOSCAN_OUTPUT_PATH"]]


# --- the MAP manifests -----------------------------------------------------------------------------------------------


def test_dockerfile_and_app_yaml_name_the_same_entrypoint(dockerfile):
    assert dockerfile["entrypoint"] == ENTRYPOINT
    assert "# Entrypoint: " + " ".join(ENTRYPOINT) in (REPO / "app.yaml").read_text(encoding="utf-8")
    assert (REPO / "apps" / "router_app" / "__main__.py").is_file()


def test_app_json_matches_the_image(dockerfile, app_yaml):
    app = _load(MAP / "app.json")
    assert json.loads(app["command"]) == dockerfile["entrypoint"]
    assert app["workingDirectory"] == dockerfile["workdir"]
    assert app["version"] == app_yaml["application"]["version"]
    assert app["sdk"] == "monai-deploy"
    env = app["environment"]
    for key, value in dockerfile["env"].items():
        if key.startswith(("HOLOSCAN_", "ONEVLM_")) or key.endswith("_OFFLINE"):
            assert env[key] == value, key
    assert app["input"] == {"path": env["HOLOSCAN_INPUT_PATH"], "formats": app_yaml["application"]["inputFormats"]}
    assert app["output"] == {"path": env["HOLOSCAN_OUTPUT_PATH"],
                             "formats": app_yaml["application"]["outputFormats"]}
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert env["HOLOSCAN_APP_MANIFEST_PATH"] == "/etc/holoscan/app.json"
    assert env["HOLOSCAN_PKG_MANIFEST_PATH"] == "/etc/holoscan/pkg.json"


def test_pkg_json_matches_app_yaml(app_yaml):
    pkg = _load(MAP / "pkg.json")
    assert pkg["resources"] == app_yaml["resources"]
    assert pkg["version"] == app_yaml["application"]["version"]
    assert pkg["applicationRoot"] == _load(MAP / "app.json")["environment"]["HOLOSCAN_APPLICATION"]
    assert pkg["modelRoot"] == "/opt/holoscan/models"


# --- the Informatics Gateway configuration ---------------------------------------------------------------------------


def test_gateway_ae_names_the_workflow(workflow):
    ae = _load(IG / "ae.json")
    assert ae["name"] == workflow["name"]
    assert ae["aeTitle"] == workflow["informatics_gateway"]["ae_title"]
    assert len(ae["aeTitle"]) <= 15
    assert ae["grouping"] == "0020,000D"  # one payload per study, as the app expects
    # `workflows` holds Workflow Manager IDs, not names; empty means "match by AE title".
    assert ae["workflows"] == []


def test_gateway_ignores_the_srs_the_app_writes():
    from pydicom.uid import Comprehensive3DSRStorage

    assert Comprehensive3DSRStorage in _load(IG / "ae.json")["ignoredSopClasses"]


def test_gateway_source_and_destinations_match_the_workflow(workflow):
    source = _load(IG / "source.json")
    assert source["name"] == source["aeTitle"]  # WM versions look the origin up by name or by AE title
    assert workflow["informatics_gateway"]["data_origins"] == [source["aeTitle"]]
    destinations = [_load(p) for p in sorted(IG.glob("destination-*.json"))]
    assert {d["name"] for d in destinations} == set(workflow["informatics_gateway"]["export_destinations"])
    for d in destinations:
        assert set(d) == {"name", "aeTitle", "hostIp", "port"}
        assert isinstance(d["port"], int) and 0 < d["port"] < 65536
        assert len(d["aeTitle"]) <= 15


def _fake_curl(folder: Path, status: str) -> dict:
    """A `curl` that logs its URL and body and answers `status`; returns the environment to run register.sh with."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    log = folder / "calls.log"
    curl = bin_dir / "curl"
    curl.write_text(f"""#!/usr/bin/env bash
out=""; url=""; body=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    --data-binary) body="${{2#@}}"; shift 2 ;;
    -w|-X|-H) shift 2 ;;
    -*) shift ;;
    *) url="$1"; shift ;;
  esac
done
{{ echo "URL $url"; cat "$body"; echo; }} >> "{log}"
echo '{{}}' > "$out"
printf '%s' "{status}"
""")
    curl.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_register_script_posts_every_body(tmp_path):
    script = IG / "register.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = _fake_curl(tmp_path, "201")
    run = subprocess.run([str(script), "http://mig.test:5000/", "3f6a08a1-0dea-44e9-ab82-1ff1adf43a8e"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    log = (tmp_path / "calls.log").read_text()
    urls = re.findall(r"^URL (\S+)$", log, flags=re.M)
    assert urls == ["http://mig.test:5000/config/source", "http://mig.test:5000/config/destination",
                    "http://mig.test:5000/config/destination", "http://mig.test:5000/config/ae"]
    ae_body = json.loads(log.split("URL http://mig.test:5000/config/ae\n", 1)[1])
    assert ae_body["workflows"] == ["3f6a08a1-0dea-44e9-ab82-1ff1adf43a8e"]
    assert ae_body["aeTitle"] == _load(IG / "ae.json")["aeTitle"]


@pytest.mark.parametrize(("status", "returncode"), [("409", 0), ("500", 1)])
def test_register_script_reports_existing_and_failed(tmp_path, status, returncode):
    env = _fake_curl(tmp_path, status)
    run = subprocess.run([str(IG / "register.sh"), "http://mig.test:5000"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == returncode, run.stdout + run.stderr
    assert (tmp_path / "calls.log").read_text().count("URL ") == 4


def test_register_script_rejects_bad_arguments(tmp_path):
    env = _fake_curl(tmp_path, "201")
    for args in ([], ["mig.test:5000"], ["http://mig.test", "bad id;rm"]):
        run = subprocess.run([str(IG / "register.sh"), *args], env=env, capture_output=True, text=True, timeout=30)
        assert run.returncode == 2, args
    assert not (tmp_path / "calls.log").exists()
