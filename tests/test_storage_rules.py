"""storage.rules: the parser/evaluator subset, and the project's rules as a decision table.

The HTTP-level deny matrix (real tokens, real uploads) is in test_localbase_storage_v0.py; here the
evaluator is driven directly so every branch of the rules file is covered cheaply.
"""

from __future__ import annotations

import pytest

from dermaloop import cases
from dermaloop.settings import PROJECT_ROOT
from localbase.rules_expr import RuleSyntaxError
from localbase.storage_rules import StorageRules

BUCKET = "demo-dermaloop.appspot.com"
MB = 1024 * 1024


def auth(uid: str, role: str | None = None) -> dict:
    token = {"sub": uid}
    if role:
        token["role"] = role
    return {"uid": uid, "token": token}


ALICE = auth("alice", "patient")
BOB = auth("bob", "patient")
DERM = auth("derm1", "dermatologist")
ADMIN = auth("ops", "admin")
NOROLE = auth("carol")


def image(size: int = 100_000, content_type: str = "image/jpeg") -> dict:
    return {"name": "x", "bucket": BUCKET, "size": size, "contentType": content_type, "metadata": {}}


@pytest.fixture(scope="module")
def rules() -> StorageRules:
    return StorageRules.from_file(PROJECT_ROOT / "storage.rules")


# (method, path, who, request.resource, expected)
MATRIX = [
    ("create", "cases/alice/c1/image.jpg", ALICE, image(), True),
    ("create", "cases/alice/c1/image.jpg", ALICE, image(20 * MB), True),
    ("create", "cases/alice/c1/image.jpg", ALICE, image(20 * MB + 1), False),
    ("create", "cases/alice/c1/image.jpg", ALICE, image(0), False),
    ("create", "cases/alice/c1/image.jpg", ALICE, image(content_type="text/plain"), False),
    ("create", "cases/alice/c1/image.jpg", ALICE, image(content_type="application/x-image/jpeg"), False),
    ("create", "cases/alice/c1/heatmap.png", ALICE, image(content_type="image/png"), False),
    ("create", "cases/bob/c1/image.jpg", ALICE, image(), False),
    ("create", "cases/alice/c1/image.jpg", None, image(), False),
    ("create", "cases/alice/c1/image.jpg", DERM, image(), False),
    # The admin role claim (an end user) reads like a dermatologist and writes nothing: heatmaps and
    # model files are written with admin credentials, which skip the rules.
    ("create", "cases/alice/c1/heatmap.png", ADMIN, image(content_type="image/png"), False),
    ("create", "cases/alice/c1/image.jpg", ADMIN, image(), False),
    ("update", "cases/alice/c1/image.jpg", ADMIN, image(), False),
    ("delete", "cases/alice/c1/image.jpg", ADMIN, None, False),
    ("delete", "cases/alice/c1/heatmap.png", ADMIN, None, False),
    ("get", "cases/alice/c1/image.jpg", ADMIN, None, True),
    ("get", "cases/alice/c1/heatmap.png", ADMIN, None, True),
    ("list", "cases", ADMIN, None, True),
    ("list", "cases/alice/c1", ADMIN, None, True),
    ("create", "cases/ops/c1/image.jpg", ADMIN, image(), True),  # their own folder, as any owner
    ("create", "cases/alice/image.jpg", ALICE, image(), False),  # not in a case folder
    ("create", "cases/alice/c1/sub/image.jpg", ALICE, image(), False),
    ("get", "cases/alice/c1/image.jpg", ALICE, None, True),
    ("get", "cases/alice/c1/heatmap.png", ALICE, None, True),
    ("get", "cases/bob/c1/image.jpg", ALICE, None, False),
    ("get", "cases/bob/c1/image.jpg", DERM, None, True),
    ("get", "cases/bob/c1/image.jpg", NOROLE, None, False),
    ("get", "cases/bob/c1/image.jpg", None, None, False),
    ("delete", "cases/alice/c1/image.jpg", ALICE, None, True),
    ("delete", "cases/alice/c1/heatmap.png", ALICE, None, False),
    ("delete", "cases/bob/c1/image.jpg", ALICE, None, False),
    ("delete", "cases/bob/c1/image.jpg", DERM, None, False),
    ("list", "cases/alice", ALICE, None, True),
    ("list", "cases/alice/c1", ALICE, None, True),
    ("list", "cases/bob", ALICE, None, False),
    ("list", "cases", ALICE, None, False),
    ("list", "cases", DERM, None, True),
    ("get", "models/cloud/v3/model.keras", ALICE, None, True),
    ("get", "models/cloud/v3/model.keras", NOROLE, None, True),
    ("get", "models/cloud/v3/model.keras", None, None, False),
    ("list", "models/device", DERM, None, True),
    ("create", "models/device/v4/model.tflite", ALICE, image(content_type="application/octet-stream"), False),
    ("create", "models/device/v4/model.tflite", DERM, image(content_type="application/octet-stream"), False),
    ("create", "models/device/v4/model.tflite", ADMIN, image(content_type="application/octet-stream"), False),
    ("update", "models/device/v4/model.tflite", ADMIN, image(content_type="application/octet-stream"), False),
    ("delete", "models/device/v4/model.tflite", ADMIN, None, False),
    ("get", "models/device/v4/model.tflite", ADMIN, None, True),
    ("list", "models/device", ADMIN, None, True),
    ("get", "other/file.txt", ADMIN, None, False),  # nothing else is reachable through /v0
    ("create", "other/file.txt", ALICE, image(), False),
]


@pytest.mark.parametrize("method,path,who,resource,expected", MATRIX)
def test_project_rules(rules, method, path, who, resource, expected):
    decision = rules.check(method, BUCKET, path, who, None, resource)
    assert decision.allowed is expected, decision.reason


# Issue 16: 'image/.*' let a stored script through ('image/png, text/html', SVG). Photos are one of
# dermaloop.cases.IMAGE_CONTENT_TYPES, matched whole; heatmaps are PNG; nothing else sits in a case.
REFUSED_TYPES = ["image/png, text/html", "image/svg+xml", "text/html", "image/gif", "image/bmp", "image/tiff",
                 "image/heic", "image/heif", "image/avif", "image/x-icon", "IMAGE/JPEG", "image/jpeg; x=1",
                 "image/", "image/jpegx", " image/jpeg", "application/octet-stream"]


@pytest.mark.parametrize("content_type", cases.IMAGE_CONTENT_TYPES)
@pytest.mark.parametrize("who,folder", [(ALICE, "alice"), (NOROLE, "carol")],
                         ids=["patient", "owner-without-role"])
def test_case_photos_of_every_allowed_type(rules, content_type, who, folder):
    assert rules.check("create", BUCKET, f"cases/{folder}/c1/image.jpg", who, None,
                       image(content_type=content_type)).allowed


@pytest.mark.parametrize("content_type", REFUSED_TYPES)
def test_case_photos_of_any_other_type_are_refused(rules, content_type):
    for who, owner in ((ALICE, "alice"), (NOROLE, "carol")):
        for method in ("create", "update"):
            decision = rules.check(method, BUCKET, f"cases/{owner}/c1/image.jpg", who, image(),
                                   image(content_type=content_type))
            assert not decision.allowed, (method, who["uid"])


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "image/png, text/html", "image/svg+xml"])
def test_no_token_writes_a_heatmap(rules, content_type):
    """The worker writes heatmaps with admin credentials; through the rules nobody does, of any type."""
    for who in (ALICE, NOROLE, DERM, ADMIN):
        for method in ("create", "update"):
            assert not rules.check(method, BUCKET, "cases/alice/c1/heatmap.png", who, None,
                                   image(content_type=content_type)).allowed, (method, who["uid"])


@pytest.mark.parametrize("name", ["page.html", "image.svg", "image.png", "heatmap.jpg", "x"])
def test_a_case_folder_holds_only_the_photo_and_the_heatmap(rules, name):
    for who in (ALICE, ADMIN):
        assert not rules.check("create", BUCKET, f"cases/{who['uid']}/c1/{name}", who, None,
                               image(content_type="image/png")).allowed


def test_expression_subset():
    source = """
    rules_version = '2';
    service firebase.storage {
      match /b/{bucket}/o {
        function big(n) { let limit = 2 * (3 + 4); return n > limit; }
        match /t/{a}/{rest=**} {
          allow read: if a in ['x', 'y'] && rest.size() >= 0 && !(a == 'y');
          allow create: if big(request.resource.size) ? request.resource.metadata.k == 'v'
                                                     : request.resource.metadata.get('k', 'none') == 'none';
          allow delete: if resource.metadata.owner == request.auth.uid || request.auth.token.admin == true;
          allow update: if request.resource.contentType.lower().matches('image/(png|jpe?g)')
                           && request.resource.size % 2 == 0 && request.resource.size / 2 == 5;
        }
      }
    }
    """
    r = StorageRules(source)
    assert r.check("get", "b", "t/x/deep/er", None).allowed
    assert r.check("get", "b", "t/x", None).allowed  # ** matches zero segments
    assert not r.check("get", "b", "t/y/q", None).allowed
    assert not r.check("get", "b", "t/z/q", None).allowed
    big = {"size": 15, "metadata": {"k": "v"}}
    assert r.check("create", "b", "t/x/f", None, None, big).allowed
    assert not r.check("create", "b", "t/x/f", None, None, {**big, "metadata": {}}).allowed
    assert r.check("create", "b", "t/x/f", None, None, {"size": 3, "metadata": {}}).allowed
    # an error on one side of || is tolerated when the other side is true
    assert r.check("delete", "b", "t/x/f", {"uid": "u", "token": {"admin": True}}, {"metadata": {}}).allowed
    assert not r.check("delete", "b", "t/x/f", None, {"metadata": {"owner": "u"}}).allowed
    assert r.check("update", "b", "t/x/f", None, None, {"contentType": "IMAGE/JPG", "size": 10}).allowed
    assert not r.check("update", "b", "t/x/f", None, None, {"contentType": "image/gif", "size": 10}).allowed


@pytest.mark.parametrize(
    "source,fragment",
    [
        ("service firebase.storage { match /b/{bucket}/o { allow read: if true } }", "expected ';'"),
        ("service cloud.firestore { }", "firebase.storage"),
        ("service firebase.storage { match /b/{bucket}/o { allow peek: if true; } }", "unknown method"),
        ("service firebase.storage { match /b/{x=**}/o { } }", "last segment"),
        ("service firebase.storage { match /b/{bucket}/o { allow read: if (true; } }", "expected ')'"),
        ("service firebase.storage { match /b/{bucket}/o { allow read: if 'unterminated; } }", "unexpected character"),
        ("rules_version = '1'; service firebase.storage { }", "rules_version"),
    ],
)
def test_syntax_errors_are_reported_with_position(source, fragment):
    with pytest.raises(RuleSyntaxError) as info:
        StorageRules(source)
    assert fragment in str(info.value)
    assert "line" in str(info.value)


def test_deny_all_denies_everything():
    r = StorageRules.deny_all()
    for method in ("get", "list", "create", "update", "delete"):
        assert not r.check(method, "b", "cases/a/b/c", ALICE, None, image()).allowed


def test_runaway_recursion_is_an_error_not_a_crash():
    r = StorageRules("""service firebase.storage { match /b/{bucket}/o {
        function f(n) { return f(n); }
        match /{x} { allow read: if f(1); } } }""")
    assert not r.check("get", "b", "x", None).allowed
