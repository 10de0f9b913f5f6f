"""The shipped model-card repository and the card schema."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onevlm.cards import CardError, CardRepository, load_card, validate_directory
from onevlm.cards.schema import CARD_ID_PATTERN, REQUIRED_FIELDS, TASK_TYPES, ModelCard, card_schema
from onevlm.cli import main

from conftest import CARDS, write_card

PAPER_MODALITIES = [
    "brain CT scan", "brain MRI scan", "breast histopathology (H&E) scan", "breast mammography scan",
    "breast ultrasound scan", "cervix cytology scan", "cervix histology scan",
    "cervix histopathology (H&E) scan", "chest CT scan", "colonoscopy scan",
    "colon histopathology (H&E) scan", "esophageal gastroscopy scan", "fundus photography scan",
    "gallbladder ultrasound scan", "kidney CT scan", "kidney histopathology scan", "kidney MRI scan",
    "kidney ultrasound scan", "liver CT scan", "liver ultrasound scan", "lung histopathology (H&E) scan",
    "prostate histopathology (H&E) scan", "skin dermatology scan", "skin dermoscopy scan",
    "skin histopathology (H&E) scan", "skin multimodal panel (dermoscopy+RCM+H&E)",
]
SECTION4_MODALITIES = ["chest X-ray scan", "retinal OCT scan", "blood cell microscopy scan", "abdominal CT scan"]


def test_shipped_cards_are_valid_and_cover_the_paper(shipped_cards):
    cards, errors = validate_directory(CARDS)
    assert errors == []
    assert len(shipped_cards) >= 84
    modalities = shipped_cards.modalities
    for modality in PAPER_MODALITIES + SECTION4_MODALITIES:
        assert modality in modalities, modality
    assert len(modalities) == len(set(modalities))  # stage 1's list is deduplicated
    assert set(modalities) == {c.modality for c in shipped_cards}


def test_cards_are_honest_documents(shipped_cards):
    for card in shipped_cards:
        assert card.training_data, card.id
        for dataset in card.training_data:
            assert len(dataset.citation) > 20, card.id
        for metric in card.metrics:  # a figure always carries its source
            assert metric.source.strip(), card.id
        assert "clinical" in card.out_of_scope.lower(), card.id
        assert card.dicom.modalities, card.id


def test_section4_tasks_have_cards(shipped_cards):
    text = {c.id: " ".join(d.name + " " + d.citation for d in c.training_data) for c in shipped_cards}
    for dataset in ["BloodMNIST", "OCTMNIST", "RetinaMNIST", "TissueMNIST", "PathMNIST", "BreastMNIST",
                    "OrganAMNIST", "OrganCMNIST", "OrganSMNIST", "PneumoniaMNIST", "ChestMNIST", "DeepLesion",
                    "PolypSet"]:
        assert any(dataset.lower() in t.lower() for t in text.values()), dataset


def test_by_modality_and_findings(small_cards):
    repo = CardRepository.load(small_cards)
    assert [c.id for c in repo.by_modality("brain CT scan")] == ["MODEL_01", "MODEL_02"]
    assert repo.by_modality("nonexistent scan") == ()
    assert repo.modalities == ("brain CT scan", "brain MRI scan", "kidney MRI scan", "chest X-ray scan", "liver CT scan")
    assert repo.findings.count("normal") == 1  # deduplicated case-insensitively
    assert repo.get("MODEL_05").modality == "chest X-ray scan"


def _mutate(folder: Path, name: str, **changes) -> Path:
    path = folder / name
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"task_caption": None}, "task_caption"),
        ({"id": "MODEL-1"}, "id"),
        ({"modality": "Brain CT"}, "modality"),
        ({"task_type": "guessing"}, "task_type"),
        ({"specialty": "astrology"}, "specialty"),
        ({"findings": []}, "findings"),
        ({"task_caption": "Detects things. And more."}, "task_caption"),
        ({"training_data": []}, "training_data"),
        ({"metrics": [{"name": "AUC", "value": 0.9}]}, "metrics[0].source"),
        ({"dicom": {"modalities": ["CTX"]}}, "dicom.modalities[0]"),  # the entry's index is part of the path
        ({"dicom": {"modalities": ["CT"], "body_parts": ["HEAD", "HEADD"]}}, "dicom.body_parts[1]"),
        ({"dicom": {"modalities": []}}, "dicom.modalities"),
        ({"findings": ["glioma", "Glioma"]}, "findings"),
        ({"training_data": [{"name": "x", "citation": "y", "url": "ftp://x"}]}, "training_data[0].url"),
        ({"execute": {"specialty": "astrology", "task": "t"}}, "execute.specialty"),
        ({"execute": {"specialty": "radiology", "task": " "}}, "execute.task"),
        ({"colour": "blue"}, "colour"),
        ({"execute": {"specialty": "radiology"}}, "execute"),
    ],
)
def test_schema_errors_name_file_and_field(small_cards, changes, field):
    _mutate(small_cards, "MODEL_03.yaml", **changes)
    with pytest.raises(CardError) as info:
        load_card(small_cards / "MODEL_03.yaml")
    assert info.value.source == "MODEL_03.yaml"
    assert info.value.field_name == field
    assert str(info.value).startswith(f"MODEL_03.yaml: field '{field}'")


def test_duplicate_id_and_file_name_mismatch(small_cards):
    (small_cards / "MODEL_07.yaml").write_text((small_cards / "MODEL_01.yaml").read_text())
    cards, errors = validate_directory(small_cards)
    assert len(cards) == 6
    assert [(e.source, e.field_name) for e in errors] == [("MODEL_07.yaml", "id")]


def test_invalid_yaml_is_reported(small_cards):
    (small_cards / "MODEL_09.yaml").write_text("id: [unclosed\n")
    with pytest.raises(CardError, match="MODEL_09.yaml: field '<document>': is not valid YAML"):
        CardRepository.load(small_cards)


def test_cli_validate_and_list(small_cards, capsys):
    assert main(["cards", "validate", str(small_cards)]) == 0
    assert "6 valid card(s), 0 error(s), 5 modalities" in capsys.readouterr().out
    _mutate(small_cards, "MODEL_02.yaml", task_type="guessing")
    write_card(small_cards, 8, "liver CT scan", "Segments liver in CT.", ["liver"], ["CT"], ["LIVER"])
    assert main(["cards", "validate", str(small_cards)]) == 1
    err = capsys.readouterr().err
    assert "MODEL_02.yaml: field 'task_type'" in err
    assert main(["cards", "list", "--cards", str(CARDS), "--modality", "retinal OCT scan"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out and all("retinal OCT scan" in line for line in out)
    assert main(["cards", "list", "--cards", str(CARDS), "--modality", "elbow MRI scan"]) == 1
    assert "no card has modality" in capsys.readouterr().err


def test_missing_folder(tmp_path, capsys):
    assert main(["cards", "validate", str(tmp_path / "nothing")]) == 2  # a user error, as for `route --cards`
    assert "not found" in capsys.readouterr().err


def test_cli_card_folder_errors_are_messages_not_tracebacks(small_cards, tmp_path, capsys):
    (small_cards / "MODEL_09.yaml").write_text("id: [unclosed\n")
    broken = small_cards / "MODEL_09.yaml"
    # `cards list`, `cards validate` and `route --cards` report the same card the same way
    assert main(["cards", "list", "--cards", str(small_cards)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}: field '<document>': is not valid YAML: line 2, column 1:")
    assert len(err.strip().splitlines()) == 1  # one line, not PyYAML's multi-line dump
    assert main(["cards", "validate", str(small_cards)]) == 1
    assert f"error: {broken}: field '<document>'" in capsys.readouterr().err
    assert main(["route", str(tmp_path), "--cards", str(small_cards), "--log", str(tmp_path / "log.jsonl")]) == 2
    assert f"error: {broken}: field '<document>'" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["cards", "list", "--cards", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: model-card folder not found: {missing}\n"
    card_file = small_cards / "MODEL_01.yaml"
    for argv in (["cards", "validate", str(card_file)], ["cards", "list", "--cards", str(card_file)]):
        assert main(argv) == 2
        assert capsys.readouterr().err == (f"error: {card_file}: not a folder (give the folder that holds the "
                                           "*.yaml cards)\n")
    assert main(["synth-model", "tiny", str(tmp_path / "model"), "--cards", str(missing)]) == 2
    assert "model-card folder not found" in capsys.readouterr().err


def _card_problem(small_cards: Path, **changes) -> tuple[str, str]:
    _mutate(small_cards, "MODEL_03.yaml", **changes)
    with pytest.raises(CardError) as info:
        load_card(small_cards / "MODEL_03.yaml")
    assert len(str(info.value).splitlines()) == 1  # one line per error
    return info.value.field_name, info.value.problem


@pytest.mark.parametrize(
    "changes,field,problem",
    [
        # no silent coercion: a value of the wrong YAML type is refused, whatever it would read as
        ({"findings": "glioma"}, "findings", "must be a list of findings or labels (got the string 'glioma')"),
        ({"findings": ["glioma", 5]}, "findings[1]", "must be a non-empty string (got the number 5)"),
        ({"intended_use": ["research"]}, "intended_use", "must be a non-empty string (got a list)"),
        ({"task_type": False}, "task_type", "must be a non-empty string (got the boolean false)"),
        ({"id": 3}, "id", "must be a non-empty string (got the number 3)"),
        ({"metrics": [{"name": "AUC", "value": [1], "source": "paper"}]}, "metrics[0].value",
         "must be a number or a string (got a list)"),
        ({"metrics": [{"name": "AUC", "value": 0.9, "source": "paper"},
                      {"name": "F1", "value": True, "source": "paper"}]}, "metrics[1].value",
         "must be a number or a string (got the boolean true)"),
        ({"metrics": [{"name": "AUC", "value": 0.9, "source": "paper", "split": 2020}]}, "metrics[0].split",
         "must be a string (got the number 2020)"),
        ({"metrics": "none"}, "metrics", "must be a list (empty when no figure is reported) (got the string 'none')"),
        ({"dicom": {"modalities": "MR"}}, "dicom.modalities",
         "must be a list of DICOM Modality codes (got the string 'MR')"),
        ({"dicom": {"modalities": ["MR"], "body_parts": ""}}, "dicom.body_parts",
         "must be a list of Body Part Examined values (got an empty string)"),
        ({"training_data": [{"name": "x", "citation": "y"}, "z"]}, "training_data[1]",
         "must be a mapping with name and citation (got the string 'z')"),
        ({"execute": "radiology"}, "execute",
         "must be a mapping with exactly specialty and task (got the string 'radiology')"),
    ],
)
def test_wrong_types_are_refused_with_their_path(small_cards, changes, field, problem):
    assert _card_problem(small_cards, **changes) == (field, problem)


@pytest.mark.parametrize(
    "changes,field,problem",
    [
        ({"colour": "blue"}, "colour", "is not a card field"),
        # a misspelt key is reported first (it explains the missing one) and the likely key is named
        ({"task_caption": None, "task_captoin": "Classifies brain tumors."}, "task_captoin",
         "is not a card field (did you mean task_caption?) (and 1 more)"),
        ({"metrics": [{"name": "AUC", "value": 0.9, "source": "paper", "spilt": "test"}]}, "metrics[0].spilt",
         "is not a metric field (did you mean split?)"),
        ({"training_data": [{"name": "x", "citation": "y", "doi": "10.1/x"}]}, "training_data[0].doi",
         "is not a dataset field"),
        ({"dicom": {"modalities": ["MR"], "bodyparts": ["HEAD"]}}, "dicom.bodyparts",
         "is not a dicom field (did you mean body_parts?)"),
        ({"execute": {"specialty": "radiology", "task": "t", "adapter": "x"}}, "execute.adapter",
         "is not an execute field"),
    ],
)
def test_unknown_keys_are_refused_by_name(small_cards, changes, field, problem):
    assert _card_problem(small_cards, **changes) == (field, problem)


def test_error_message_names_file_path_and_problem(small_cards):
    _mutate(small_cards, "MODEL_03.yaml", metrics=[{"name": "AUC", "value": 0.9, "source": "paper"},
                                                    {"name": "F1", "value": 0.8, "source": "paper"},
                                                    {"name": "ACC", "value": {"mean": 0.7}, "source": "paper"}])
    with pytest.raises(CardError) as info:
        load_card(small_cards / "MODEL_03.yaml")
    assert str(info.value) == ("MODEL_03.yaml: field 'metrics[2].value': must be a number or a string "
                               "(got a mapping)")


def test_values_keep_their_yaml_type():
    data = yaml.safe_load((CARDS / "MODEL_04.yaml").read_text())
    data["metrics"] = [{"name": "AUC", "value": 91, "source": "paper"},
                       {"name": "F1", "value": "0.90", "source": "paper", "split": "test"}]
    card = ModelCard.from_mapping(data)
    assert [type(m.value) for m in card.metrics] == [int, str]  # never converted
    data["metrics"] = None  # `metrics:` with nothing after it: no figure reported
    assert ModelCard.from_mapping(data).metrics == ()
    with pytest.raises(CardError, match="field '<document>': a card must be a YAML mapping"):
        ModelCard.from_mapping([data], source="x.yaml")


def test_card_schema_describes_the_file():
    schema = json.loads(json.dumps(card_schema()))  # plain JSON, as `onevlm cards schema` prints it
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(REQUIRED_FIELDS)
    assert set(schema["properties"]) == set(REQUIRED_FIELDS) | {"execute"}
    for part in schema["$defs"].values():  # every section refuses unknown keys too
        assert part["additionalProperties"] is False
    assert set(schema["properties"]["task_type"]["enum"]) == set(TASK_TYPES)
    assert schema["properties"]["id"]["pattern"] == CARD_ID_PATTERN.pattern


def test_card_schema_checks_cards_as_the_loader_does():
    jsonschema = pytest.importorskip("jsonschema")  # not a project dependency: checked where installed
    schema = card_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(CARDS.glob("*.yaml")):  # the shipped cards pass the schema an editor checks
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name
    wrong = yaml.safe_load((CARDS / "MODEL_04.yaml").read_text()) | {"colour": "blue"}
    assert list(validator.iter_errors(wrong))


def test_cli_prints_the_card_schema(capsys):
    assert main(["cards", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == card_schema()


def test_module_cli_still_validates(small_cards):
    run = subprocess.run([sys.executable, "-m", "onevlm.cards", str(small_cards)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "6 valid cards, 0 errors, 5 modalities" in run.stdout
