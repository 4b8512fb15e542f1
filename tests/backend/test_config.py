"""The settings object: environment variables with the DINOLABEL_ prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.config import Settings


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DINOLABEL_BOX_THRESHOLD", "0.5")
    monkeypatch.setenv("DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    monkeypatch.setenv("BASIC_AUTH_USER", "ls")  # Label Studio's own name for it
    settings = Settings()
    assert settings.box_threshold == 0.5 and settings.local_files_document_root == tmp_path
    assert settings.basic_auth_user == "ls"


def test_empty_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_FILES_DOCUMENT_ROOT", "DETECTOR_REVISION", "REDIS_URL", "WEBHOOK_SECRET"):
        monkeypatch.setenv(f"DINOLABEL_{name}", "")
    settings = Settings()
    assert settings.local_files_document_root is None, "not the current folder"
    assert (settings.detector_revision, settings.redis_url, settings.webhook_secret) == (None, None, None)


def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOLABEL_BOX_THRESHOLD", "1.5")
    with pytest.raises(ValidationError, match="box_threshold"):
        Settings()


def test_fetch_allow_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOLABEL_FETCH_ALLOW", " minio, 10.0.0.0/8 ,,fd00::/8")
    assert Settings().fetch_allow == ("minio", "10.0.0.0/8", "fd00::/8")
    monkeypatch.setenv("DINOLABEL_FETCH_ALLOW", "")
    assert Settings().fetch_allow == ()
    monkeypatch.setenv("DINOLABEL_FETCH_ALLOW", "minio:9000")
    with pytest.raises(ValidationError, match="'minio:9000' is not a host name, an IP address, a CIDR network"):
        Settings()


def test_priority_fields_are_plain_names_and_two_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOLABEL_PRIORITY_RANK_FIELD", "queue_rank")
    assert (Settings().priority_rank_field, Settings().priority_reason_field) == ("queue_rank", "dinolabel_reason")
    monkeypatch.setenv("DINOLABEL_PRIORITY_RANK_FIELD", "data.rank")
    with pytest.raises(ValidationError, match="priority_rank_field"):
        Settings()
    monkeypatch.setenv("DINOLABEL_PRIORITY_RANK_FIELD", "dinolabel_reason")
    with pytest.raises(ValidationError, match="name the same task data field"):
        Settings()


def test_the_priority_uncertainty_weight_is_a_share_between_0_and_1(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().priority_uncertainty_weight == 0.3
    monkeypatch.setenv("DINOLABEL_PRIORITY_UNCERTAINTY_WEIGHT", "0")
    assert Settings().priority_uncertainty_weight == 0.0
    for bad in ("1.5", "-0.1", "nan"):
        monkeypatch.setenv("DINOLABEL_PRIORITY_UNCERTAINTY_WEIGHT", bad)
        with pytest.raises(ValidationError, match="priority_uncertainty_weight"):
            Settings()
