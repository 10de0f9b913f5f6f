"""The shipped model-card repository and the card schema."""

from pathlib import Path

import pytest
import yaml

from onevlm.cards import CardError, CardRepository, load_card, validate_directory
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
        ({"dicom": {"modalities": ["CTX"]}}, "dicom.modalities"),
        ({"dicom": {"modalities": ["CT"], "body_parts": ["HEADD"]}}, "dicom.body_parts"),
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
