"""`push_to_hub=<owner/name>` (distil.utils.hub): what would be uploaded, checked offline with huggingface_hub's
own client (create_repo, create_branch, upload_folder: the README's YAML check, preupload, commit) against a
mocked HTTP transport; a bad repository id is refused in one line before anything loads."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http
from hydra import compose, initialize_config_dir
from test_bad_input import _cli, cli_home  # noqa: F401  (a fixture)
from test_model_card import EVALS, run_dir  # noqa: F401  (a fixture)
from test_train import compose_train, home, models_root  # noqa: F401  (fixtures)

from distil.config.schema import validate
from distil.utils.errors import ConfigError
from distil.utils.hub import HubUploadError, is_repo_id, push_folder
from distil.utils.paths import CONF_DIR
from distil.whisper import ct2_export
from distil.whisper.model_card import EVALUATION_FILE, evaluation_summary


class FakeHub:
    """The Hub's HTTP endpoints an upload calls, recording each request; anything else is a 404."""

    def __init__(self, refuse: int | None = None):
        self.requests: list[tuple[str, str]] = []
        self.created: dict | None = None
        self.commits: list[dict] = []
        self.validated: list[str] = []
        self.refuse = refuse

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if self.refuse:
            return httpx2.Response(self.refuse, json={"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            self.created = json.loads(request.content)
            return httpx2.Response(
                200, json={"url": f"https://huggingface.co/{self.created['organization']}/x"}
            )
        if path == "/api/validate-yaml":  # upload_folder checks a README.md's metadata first
            self.validated.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if "/preupload/" in path:  # every file inline ("regular"): no LFS or Xet transfer to mock
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if "/commit/" in path:
            header, *files = (json.loads(line) for line in request.content.decode().splitlines())
            self.commits.append(
                {
                    "revision": path.rsplit("/", 1)[1],
                    "message": header["value"]["summary"],
                    "files": {f["value"]["path"]: base64.b64decode(f["value"]["content"]) for f in files},
                }
            )
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/me/x/commit/abc", "commitOid": "abc"}
            )
        return httpx2.Response(404, json={"error": "not mocked"})


@contextmanager
def fake_hub_session() -> Iterator[FakeHub]:
    """The real huggingface_hub client, its HTTP session replaced by `FakeHub` (nothing leaves the machine)."""
    fake = FakeHub()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", "hf_test_token")
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
        try:
            yield fake
        finally:
            _http.set_client_factory(_http.default_client_factory)


@pytest.fixture
def hub():
    with fake_hub_session() as fake:
        yield fake


def uploaded_card(commit: dict) -> ModelCard:
    """The model card a commit uploads, parsed as the Hub client parses it (metadata errors raise)."""
    return ModelCard(commit["files"]["README.md"].decode(), ignore_metadata_errors=False)


def _export_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("export", overrides=overrides)
    validate(cfg, "export")
    return cfg


def test_distil_export_uploads_the_export_and_its_card(run_dir, hub):  # noqa: F811
    from distil.export import export

    (run_dir / "best" / EVALUATION_FILE).write_text(json.dumps(evaluation_summary(EVALS)))
    cfg = _export_cfg(
        [
            "model=path",
            f"model.path={run_dir / 'best'}",
            "quantization=int8",
            "push_to_hub=me/my-student-ct2-int8",
            "hub.revision=v1",
            "hub.commit_message=first upload",
        ]
    )
    try:
        out = export(cfg)
    finally:
        ct2_export.restore_float_mode()
    assert hub.created == {"name": "my-student-ct2-int8", "organization": "me", "visibility": "private"}
    assert ("POST", "/api/models/me/my-student-ct2-int8/branch/v1") in hub.requests
    [commit] = hub.commits
    assert commit["revision"] == "v1" and commit["message"] == "first upload"
    on_disk = {p.name for p in out.iterdir() if not p.name.startswith(".")}  # local records stay home
    assert set(commit["files"]) == on_disk and {"model.bin", "README.md"} <= on_disk
    assert commit["files"]["model.bin"] == (out / "model.bin").read_bytes()
    card = uploaded_card(commit)
    assert card.data.library_name == "ctranslate2" and hub.validated == [
        commit["files"]["README.md"].decode()
    ]


def test_defaults_upload_to_main_and_a_public_repository_on_request(tmp_path, hub):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# x\n")
    (tmp_path / "config.json").write_text("{}")
    push_folder(tmp_path, "me/x", private=False)
    assert hub.created["visibility"] == "public"
    assert not [r for r in hub.requests if "/branch/" in r[1]]
    [commit] = hub.commits
    assert commit["revision"] == "main" and commit["message"] == f"Upload {tmp_path.name} (distil)"


def test_a_refused_upload_is_one_line_that_says_how_to_log_in(tmp_path, hub):
    hub.refuse = 401
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubUploadError, match=r"^push_to_hub=me/x: the Hub refused .*hf auth login") as err:
        push_folder(tmp_path, "me/x")
    assert "\n" not in str(err.value) and f"hf upload me/x {tmp_path}" in str(err.value)


@pytest.mark.unit
def test_repository_ids_need_an_owner():
    assert is_repo_id("me/my-student") and is_repo_id("org-1/whisper.small_v2")
    for bad in ("my-student", "a/b/c", "me/bad name", "/x", "me/", "me/-x", None, 3):
        assert not is_repo_id(bad), bad


@pytest.mark.unit
@pytest.mark.parametrize(
    ("command", "override", "message"),
    [
        (
            "export",
            "push_to_hub=my-student",
            "push_to_hub must be a Hub repository id owner/name or null, got 'my-student'",
        ),
        (
            "train",
            "push_to_hub=a/b/c",
            "push_to_hub must be a Hub repository id owner/name or null, got 'a/b/c'",
        ),
        (
            "pipeline",
            "push_to_hub=me",
            "push_to_hub must be a Hub repository id owner/name or null, got 'me'",
        ),
        ("export", "hub.private=maybe", "hub.private must be true or false, got 'maybe'"),
        ("train", "hub.revision=''", "hub.revision must be a non-empty string or null, got ''"),
        ("train", "push_to_hub=me/x export=false", "push_to_hub=me/x uploads the run's exported student"),
    ],
)
def test_bad_upload_settings_are_refused_naming_the_key(command, override, message):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(command, overrides=override.split())
    with pytest.raises(ConfigError) as err:
        validate(cfg, command)
    assert str(err.value).startswith(message), err.value


def test_push_settings_do_not_change_the_training_run_directory():
    from distil.train import override_dirname

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        plain = override_dirname(["experiment=demo"])
        assert override_dirname(["experiment=demo", "push_to_hub=me/x", "hub.private=false"]) == plain


@pytest.mark.slow  # ~15 s: the command's start-up
def test_the_command_refuses_a_bare_repository_name_in_one_line(cli_home):  # noqa: F811
    result = _cli(cli_home, "distil.export", "model=tiny_random", "push_to_hub=my-student")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: push_to_hub must be a Hub repository id owner/name or null, got 'my-student'"


@pytest.mark.slow  # ~12 s: a short training run
def test_training_uploads_its_best_export_at_the_end(home, hub):  # noqa: F811
    from distil.train import train

    summary = train(compose_train(home, ["push_to_hub=me/tiny-student"]))
    [commit] = hub.commits
    best = Path(summary["exports"]["best"])
    assert set(commit["files"]) == {p.name for p in best.iterdir() if not p.name.startswith(".")}
    assert uploaded_card(commit).data.library_name == "transformers"
    assert summary["hub_commit"] == "https://huggingface.co/me/x/commit/abc"
