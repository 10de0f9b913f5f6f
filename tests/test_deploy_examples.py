"""The deployment examples under ``deploy/`` stay consistent with each other, with the app and with upstream (fast).

Research use only: not for clinical use.

What is checked here is what can be checked without a Workflow Manager, an Informatics Gateway, Argo or Docker:
the files parse; the workflow obeys the rules the Workflow Manager's own validator enforces (task ids, task types,
destinations, Argo arguments); its conditions, evaluated the way the Workflow Manager evaluates them, read only
top-level scalar keys of the ``metadata.json`` the app writes, and branch as intended; the MAP command, paths,
environment and resources match ``Dockerfile`` and ``app.yaml``; the Informatics Gateway bodies pass the gateway's
own validation and name the workflow's AE title, origin and destinations; the README's examples keep what the
gateway would otherwise reset; and ``register.sh`` POSTs the right bodies to the right endpoints (against a
stand-in ``curl``).

Each upstream rule names the file it comes from, as read in stored copies of
``Project-MONAI/monai-deploy-workflow-manager`` (WM) and ``Project-MONAI/monai-deploy-informatics-gateway`` (MIG);
the project's issue compared against WM 9e10e95 and MIG 89c9218, and a live deployment may run a newer version.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest
import yaml

from onevlm.reports.routing_metadata import DETAIL_FILE, build_detail, build_metadata, series_entry

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
WORKFLOW_FILE = DEPLOY / "workflow-manager" / "onevlm-router-workflow.json"
ARGO_TEMPLATE_FILE = DEPLOY / "workflow-manager" / "argo-workflow-template.json"
IG = DEPLOY / "informatics-gateway"
MAP = DEPLOY / "map"
README = DEPLOY / "README.md"

ENTRYPOINT = ["python", "-m", "apps.router_app", "-i", "/var/holoscan/input", "-o", "/var/holoscan/output"]

# From the Workflow Manager's source (ValidationConstants.ValidTaskTypes, ArgoParameters.VaildParameters).
WM_TASK_TYPES = {"argo", "aide_clinical_review", "router", "export", "docker", "email", "remote_app_execution",
                 "export_hl7"}
WM_ARGO_ARGS = {"namespace", "server_url", "allow_insecure", "workflow_template_name", "timeoutSeconds", "apiToken",
                "endpoint", "username", "password", "exchange", "virtualHost", "resources", "parameters", "priority",
                "cpu", "memory", "gpu_required"}
# WM src/WorkflowManager/Contracts/Models/Workflow.cs: the workflow's JSON properties (dataRetentionDays, an int,
# -1 = never delete; predicate, a list of conditions) are accepted beside the spec's five.
WM_WORKFLOW_KEYS = {"name", "version", "description", "informatics_gateway", "tasks", "dataRetentionDays", "predicate"}
# WM src/WorkflowManager/WorkflowManager/Validators/WorkflowValidator.cs (ValidateArgoTask): the `priority` values.
WM_PRIORITIES = {"high", "standard", "low"}
PARAMETER = re.compile(r"\{\{\s*(.*?)\s*\}\}")

# MIG src/Configuration/ValidationExtensions.cs: IsAeTitleValid, IsValidHostNameIp, IsPortValid, IsValidDicomTag.
MIG_AE_TITLE = re.compile(r"[a-zA-Z0-9_\-]+")  # and 1 to 15 characters
MIG_IP = re.compile(r"((25[0-5]|(2[0-4]|1\d|[1-9]|)\d)\.?\b){4}")
MIG_HOST_NAME = re.compile(r"(([a-zA-Z]|[a-zA-Z][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
                           r"([A-Za-z]|[A-Za-z][A-Za-z0-9\-]*[A-Za-z0-9])")
MIG_GROUPING_TAGS = {"0010,0020", "0020,000D", "0020,000E"}  # PatientID, StudyInstanceUID, SeriesInstanceUID
# MIG src/Api/MonaiApplicationEntity.cs: the properties a client sets (the others are the gateway's own).
MIG_AE_KEYS = {"name", "aeTitle", "grouping", "workflows", "plugInAssemblies", "ignoredSopClasses", "allowedSopClasses",
               "timeout"}


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
    assert set(workflow) <= WM_WORKFLOW_KEYS, set(workflow) - WM_WORKFLOW_KEYS
    assert isinstance(workflow.get("dataRetentionDays", 3), int)
    assert isinstance(workflow.get("predicate", []), list)
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
        assert args.get("priority", "standard").lower() in WM_PRIORITIES
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


def _entries(routed: int, errors: int, skipped: int = 0, reviews: int = 0, sets: int = 0) -> list[dict]:
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
    return entries


def _metadata(routed: int, errors: int, skipped: int = 0, reviews: int = 0, sets: int = 0) -> dict:
    return build_metadata(_entries(routed, errors, skipped, reviews, sets))


# --- the Workflow Manager's condition language, as its sources evaluate it -------------------------------------------
#
# WM src/WorkflowManager/ConditionsResolver/Parser/ConditionalParameterParser.cs (ResolveParameters, ResultNullCheck,
# ResolveExecutionTasks, GetValueFromDictionary, TryParse) and .../Resovler/Conditional.cs (Parse, Evaluate,
# ContainsEvaluate). Only what this workflow can meet is modelled: AND (not OR, not brackets around clauses).

NULL = "NULL"


class ConditionFailed(Exception):
    """The Workflow Manager's parser throws; TryParse catches it and the condition is false."""


def _resolve(condition: str, result: dict) -> str:
    """Replace each ``{{ context.executions.TASK.result.KEY }}`` by its value, as ``ResolveParameters`` does."""
    def value(match: re.Match) -> str:
        parts = match.group(1).split(".")
        assert parts[:2] == ["context", "executions"] and parts[3] == "result", match.group(0)
        key = parts[4] if len(parts) > 4 else None  # ResolveExecutionTasks reads the fifth part only: no nesting
        if key not in result:
            text = ""  # a missing key resolves to null
        elif result[key] is None:
            # GetValueFromDictionary calls ToString() on a JSON null: the parser throws, the condition is false
            raise ConditionFailed(f"{key} is null")
        else:
            raw = result[key]
            assert not isinstance(raw, (list, dict)), f"{key} is not a scalar"
            text = raw if isinstance(raw, str) else str(raw)  # C#: True/False, numbers in invariant form
        if text.strip().upper() in ("", NULL, "UNDEFINED"):  # ResultNullCheck
            text = NULL
        return text if text.startswith("[") and text.endswith("]") else f"'{text}'"

    return PARAMETER.sub(value, condition)


def _operand(text: str) -> tuple[str, bool]:
    text = text.strip()
    if text.startswith("["):
        return text[1:-1], True
    if text.upper() == NULL or text in ("''", '""'):  # Conditional.Parse turns null, '' and undefined into NULL
        return NULL, False
    return text[1:-1], False


def _clean(item: str) -> str:
    item = item.strip().strip('"').strip("'").strip("\u201c").strip("\u201d")
    return NULL if item.upper() in (NULL, "UNDEFINED") else item


def _compare(clause: str) -> bool:
    """One ``LEFT OP RIGHT`` clause, as ``Conditional.Evaluate`` compares it."""
    operand = r"(\[[^\]]*\]|'[^']*'|NULL)"
    match = re.fullmatch(rf"\s*{operand}\s+(==|!=|>=|<=|=>|=<|>|<|NOT_CONTAINS|CONTAINS)\s+{operand}\s*", clause,
                         flags=re.IGNORECASE)
    if match is None:
        raise ConditionFailed(f"cannot parse {clause!r}")
    (left, left_array), op, (right, right_array) = _operand(match[1]), match[2].upper(), _operand(match[3])
    if op in ("==", "!="):  # strings, trimmed, compared ignoring case (InvariantCultureIgnoreCase)
        return (left.strip().lower() == right.strip().lower()) == (op == "==")
    if op in ("CONTAINS", "NOT_CONTAINS"):
        if left_array and right_array:
            found = bool({_clean(i) for i in left.split(",")} & {_clean(i) for i in right.split(",")})
        elif left_array:
            found = any(_clean(i) == right for i in left.split(","))
        else:  # no array on the left: the right-hand string is split at commas, the left is looked up in it
            found = any(_clean(i) == left for i in right.split(","))
        return found == (op == "CONTAINS")
    try:  # Convert.ToDecimal: a value that is not a number throws
        a, b = Decimal(left), Decimal(right)
    except InvalidOperation:
        raise ConditionFailed(f"not a number in {clause!r}") from None
    return {">": a > b, "<": a < b, ">=": a >= b, "=>": a >= b, "<=": a <= b, "=<": a <= b}[op]


def _evaluate(conditions: str | list[str], result: dict) -> bool:
    """A task destination's conditions (a list is joined with AND), true or false as the Workflow Manager decides."""
    text = " AND ".join(conditions) if isinstance(conditions, list) else conditions
    assert " OR " not in text.upper(), "OR is not modelled here"
    try:
        return all(_compare(clause) for clause in re.split(r"\s+AND\s+", _resolve(text, result), flags=re.IGNORECASE))
    except ConditionFailed:
        return False


def _key(name: str) -> str:
    return "{{ context.executions.router.result." + name + " }}"


def test_the_condition_language_is_modelled_as_upstream_evaluates_it():
    result = {"needs_review": True, "with_cards": 2, "cards": "MODEL_01,MODEL_03", "outcome": "routed",
              "confidence": 0.87, "none": None, "a": "x", "a.b": "y"}
    # Conditional.cs: `==` compares strings ignoring case, so a JSON true (C# "True") equals 'true'
    assert _evaluate(f"{_key('needs_review')} == 'true'", result)
    assert _evaluate(f"{_key('outcome')} == 'ROUTED'", result)
    assert not _evaluate(f"{_key('outcome')} != 'Routed'", result)
    # numbers compare as decimals; a word where a number is expected makes the condition false
    assert _evaluate(f"{_key('with_cards')} > '1'", result) and _evaluate(f"{_key('confidence')} >= '0.5'", result)
    assert not _evaluate(f"{_key('outcome')} > '0'", result)
    # ConditionalParameterParser.cs: a missing key is NULL: `== 'false'` and `> '0'` are false, but `!= 'true'` is
    # true, so a condition that must not pass on a missing key tests `== 'false'`, never `!= 'true'`
    assert _evaluate(f"{_key('missing')} == NULL", result)
    assert not _evaluate(f"{_key('missing')} == 'false'", result) and not _evaluate(f"{_key('missing')} > '0'", result)
    assert _evaluate(f"{_key('missing')} != 'true'", result)
    # ...whereas a JSON null makes the parser throw: false, even for `== NULL` (metadata.json never holds one)
    assert not _evaluate(f"{_key('none')} == NULL", result)
    # CONTAINS without brackets splits the right-hand side at commas: the card goes on the left
    assert _evaluate(f"'MODEL_03' CONTAINS {_key('cards')}", result)
    assert not _evaluate(f"{_key('cards')} CONTAINS 'MODEL_03'", result)
    assert _evaluate(f"'MODEL_02' NOT_CONTAINS {_key('cards')}", result)
    # only the fifth part of the path is read: `result.a.b` is the value of `a`, so keys hold no dots
    assert _evaluate(f"{_key('a.b')} == 'x'", result)


def test_metadata_json_holds_scalars_only():
    """WM ArgoMetadataRepository.cs reads metadata.json into a flat Dictionary<string, object>; conditions read
    top-level keys only (ConditionalParameterParser.cs), and the WM's documentation (guidelines/mwm-workflow-spec.md,
    "Argo Metadata") shows scalar values only. Lists go to series.json; a value that does not exist is left out."""
    problems = [{"file": "broken.dcm", "error": "broken.dcm: not a DICOM file"}]
    calibration = {"calibration_id": "site-1"}
    for counts in ((2, 0, 1, 0, 0), (0, 0, 0, 0, 0), (1, 1, 2, 1, 1)):
        entries = _entries(*counts)
        for document in (build_metadata(entries), build_metadata(entries, problems, calibration)):
            assert all(isinstance(v, (str, int, float, bool)) for v in document.values()), document
            assert all(re.fullmatch(r"[a-z_]+", k) for k in document), "a key a condition's path can name"
            assert json.loads(json.dumps(document)) == document
            assert document["detail_file"] == DETAIL_FILE
    meta = build_metadata(_entries(1, 0, 1, 0, 1), problems, calibration)
    assert meta["studies"] == 1 and meta["study_instance_uid"] == "1.2.3" and meta["calibration_id"] == "site-1"
    assert meta["cards"] == "MODEL_01,MODEL_02" and meta["unreadable"] == 1 and meta["outcome"] == "failed"
    empty = build_metadata([])
    assert empty["outcome"] == "skipped" and "confidence" not in empty and "study_instance_uid" not in empty
    detail = build_detail(_entries(1, 0, 1, 0, 1), problems)
    assert detail["model_card_ids"] == ["MODEL_01", "MODEL_02"] and detail["study_instance_uids"] == ["1.2.3"]
    assert len(detail["entries"]) == 3 and detail["problems"] == problems


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
    chosen = {d["name"] for d in tasks["router_result"]["task_destinations"] if _evaluate(d["conditions"], result)}
    assert chosen == expected


def test_without_metadata_json_nothing_is_exported(tasks):
    """No metadata.json found (ArgoMetadataRepository returns an empty dictionary): every key is NULL."""
    assert not any(_evaluate(d["conditions"], {}) for d in tasks["router_result"]["task_destinations"])


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


def _valid_ae_title(title: str) -> bool:
    return 0 < len(title) <= 15 and MIG_AE_TITLE.fullmatch(title) is not None


def _valid_host(host: str) -> bool:
    return bool(host.strip()) and (MIG_IP.fullmatch(host) is not None or MIG_HOST_NAME.fullmatch(host) is not None)


def test_the_gateways_validation_rules_as_upstream_writes_them():
    """MIG src/Configuration/ValidationExtensions.cs, on examples that pass and fail there."""
    assert all(_valid_ae_title(t) for t in ("ONEVLM", "REVIEW_PACS", "SOURCE-PACS", "A" * 15))
    assert not any(_valid_ae_title(t) for t in ("", "A" * 16, "ONE VLM", "ONEVLM.1", "ÉCHO"))
    assert all(_valid_host(h) for h in ("192.0.2.10", "255.255.255.255", "pacs", "pacs-1.example.org"))
    assert not any(_valid_host(h) for h in ("", "256.1.1.1", "-pacs.example.org", "pacs_1", "2001:db8::1"))


def test_gateway_bodies_pass_the_gateways_validation(workflow):
    """What MIG checks before it stores an AE, a source or a destination (ValidationExtensions.cs,
    MonaiAeTitleController.cs ValidateCreateAsync, src/Api/MonaiApplicationEntity.cs)."""
    ae = _load(IG / "ae.json")
    assert set(ae) <= MIG_AE_KEYS, set(ae) - MIG_AE_KEYS
    assert _valid_ae_title(ae["aeTitle"]) and _valid_ae_title(workflow["informatics_gateway"]["ae_title"])
    assert ae["grouping"].strip("()").upper() in MIG_GROUPING_TAGS
    assert isinstance(ae["timeout"], int) and ae["timeout"] >= 0  # a uint
    # allowed and ignored SOP classes are mutually exclusive
    assert not (ae.get("allowedSopClasses") and ae.get("ignoredSopClasses"))
    for path in [IG / "source.json", *sorted(IG.glob("destination-*.json"))]:
        body = _load(path)
        assert body["name"].strip(), path.name
        assert _valid_ae_title(body["aeTitle"]) and _valid_host(body["hostIp"]), path.name
        if "port" in body:
            assert isinstance(body["port"], int) and 0 < body["port"] <= 65535, path.name


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


# --- the README's instructions ---------------------------------------------------------------------------------------


def test_readme_put_example_resends_the_whole_ae():
    """MIG MonaiAeTitleController.cs (Edit): a PUT replaces grouping, timeout, workflows, allowed and ignored SOP
    classes with the body's, defaults for any left out (`IgnoredSopClasses = item.IgnoredSopClasses ?? []`). A body
    without ignoredSopClasses would let the app's own SRs flow back into ONEVLM."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"curl -X PUT \"\$MIG_URL/config/ae\".*?--data '(\{.*?\})'", text, flags=re.S)
    assert match, "the README's PUT /config/ae example"
    body = json.loads(match[1])
    ae = _load(IG / "ae.json")
    assert body["workflows"] == ["<WORKFLOW_ID>"]
    for key in ("name", "grouping", "timeout", "ignoredSopClasses"):
        assert body[key] == ae[key], key
    assert not body.get("allowedSopClasses")


def test_readme_sends_from_the_registered_source():
    """MIG ApplicationEntityManager.cs (IsValidSourceAsync): with rejectUnknownSources the calling AE title and the
    association's host must both match a registered source."""
    text = README.read_text(encoding="utf-8")
    source = _load(IG / "source.json")
    assert f"storescu -aet {source['aeTitle']} -aec {_load(IG / 'ae.json')['aeTitle']} " in text
    assert "rejectUnknownSources" in text and f"`{source['hostIp']}`" in text


def test_readme_says_what_upstream_does():
    text = README.read_text(encoding="utf-8")
    assert "guidelines/mwm-workflow-spec.md" in text and "docs/setup/mwm-workflow-spec.md" not in text
    assert "PriorityClass named `standard`" not in text and "taskPriorityClass" in text
    for key in build_metadata(_entries(1, 1, 1, 1, 1), [{"file": "x", "error": "y"}], {"calibration_id": "c"}):
        assert f"`{key}`" in text, f"the README names the condition key {key}"
