"""The documented RTDB REST protocol against a real localbase with ``requests``: response shapes,
print/shallow/export, method override, ETags, namespaces, server values, and bad input."""

from __future__ import annotations

import json
import re
import threading
import uuid

import pytest
import requests

from localbase.tokens import mint_id_token

ADMIN = {"Authorization": "Bearer owner"}


@pytest.fixture(scope="module")
def base(localbase) -> str:
    return localbase.database_url


@pytest.fixture(scope="module")
def ns() -> str:
    """A namespace of its own, so nothing written here shows up in other tests' data."""
    return "rtdb-rest-tests"


@pytest.fixture
def path() -> str:
    return f"/t/rest-{uuid.uuid4().hex}"


def call(method: str, base: str, path: str, ns: str, body=None, params=None, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    return requests.request(method, f"{base}{path}.json", params={**(params or {}), "ns": ns},
                            headers={**ADMIN, **(headers or {})}, data=data, timeout=60)


def test_write_responses(base, ns, path):
    put = call("PUT", base, path, ns, {"a": 1, "t": {".sv": "timestamp"}, "arr": ["x", "y"]})
    assert put.status_code == 200
    assert put.headers["Content-Type"].startswith("application/json")
    written = put.json()
    assert written["a"] == 1 and isinstance(written["t"], int) and written["arr"] == ["x", "y"]
    silent = call("PUT", base, path + "/b", ns, 2, params={"print": "silent"})
    assert silent.status_code == 204 and silent.content == b""
    pushed = call("POST", base, path + "/list", ns, {"v": 1})
    name = pushed.json()["name"]
    assert re.fullmatch(r"[-0-9A-Za-z_]{20}", name)
    patched = call("PATCH", base, path, ns, {"c/d": 3, "a": None})
    assert patched.status_code == 200 and patched.json() == {"c/d": 3, "a": None}
    assert call("GET", base, path, ns).json() == {"t": written["t"], "arr": ["x", "y"], "b": 2,
                                                  "list": {name: {"v": 1}}, "c": {"d": 3}}
    deleted = call("DELETE", base, path, ns)
    assert deleted.status_code == 200 and deleted.json() is None
    assert call("GET", base, path, ns).json() is None


def test_read_formats(base, ns, path):
    call("PUT", base, path, ns, {"a": {"deep": 1}, "b": {".value": "v", ".priority": 2}, ".priority": "top"})
    assert call("GET", base, path, ns).json() == {"a": {"deep": 1}, "b": "v"}
    assert call("GET", base, path, ns, params={"shallow": "true"}).json() == {"a": True, "b": True}
    assert call("GET", base, path + "/a/deep", ns, params={"shallow": "true"}).json() == 1
    assert call("GET", base, path, ns, params={"format": "export"}).json() == {
        "a": {"deep": 1}, "b": {".value": "v", ".priority": 2}, ".priority": "top"}
    pretty = call("GET", base, path + "/a", ns, params={"print": "pretty"})
    assert pretty.text == '{\n  "deep": 1\n}'
    assert call("GET", base, path, ns, params={"print": "silent"}).status_code == 204
    jsonp = call("GET", base, path + "/a", ns, params={"callback": "gotIt"})
    assert jsonp.text == 'gotIt({"deep":1});'
    download = call("GET", base, path, ns, params={"download": "backup.json"})
    assert 'filename="backup.json"' in download.headers["Content-Disposition"]
    prioritised = call("GET", base, path, ns, params={"orderBy": '"$priority"', "limitToFirst": "1"}).json()
    assert list(prioritised) == ["a"]  # no priority sorts before a priority


def test_method_override(base, ns, path):
    headers = {"X-HTTP-Method-Override": "PUT"}
    assert call("POST", base, path, ns, {"a": 1, "b": 2}, headers=headers).json() == {"a": 1, "b": 2}
    call("POST", base, path, ns, {"b": 3}, headers={"X-HTTP-Method-Override": "PATCH"})
    assert call("GET", base, path, ns).json() == {"a": 1, "b": 3}
    call("POST", base, path, ns, headers={"X-HTTP-Method-Override": "DELETE"}, raw=b"")
    assert call("GET", base, path, ns).json() is None


def test_etags_over_rest(base, ns, path):
    first = call("GET", base, path, ns, headers={"X-Firebase-ETag": "true"})
    assert first.headers["ETag"] == "null_etag" and first.json() is None
    created = call("PUT", base, path, ns, {"v": 1}, headers={"if-match": "null_etag"})
    assert created.status_code == 200 and created.headers["ETag"] != "null_etag"
    tag = created.headers["ETag"]
    again = call("PUT", base, path, ns, {"v": 2}, headers={"if-match": "null_etag"})  # create-only fails
    assert again.status_code == 412 and again.json() == {"v": 1} and again.headers["ETag"] == tag
    assert call("GET", base, path, ns, headers={"if-none-match": tag}).status_code == 304
    stale_delete = call("DELETE", base, path, ns, headers={"if-match": "bogus"})
    assert stale_delete.status_code == 412 and call("GET", base, path, ns).json() == {"v": 1}
    assert call("DELETE", base, path, ns, headers={"if-match": tag}).status_code == 200
    assert call("GET", base, path, ns).json() is None


def test_namespaces_are_independent(base, path):
    call("PUT", base, path, "ns-one", "one")
    call("PUT", base, path, "ns-two", "two")
    assert call("GET", base, path, "ns-one").json() == "one"
    assert call("GET", base, path, "ns-two").json() == "two"
    listing = requests.get(f"{base}/.inspect/databases.json", headers=ADMIN).json()
    assert {"name": "ns-one"} in listing and {"name": "ns-two"} in listing


def test_concurrent_increments_are_exact(base, ns, path):
    def bump():
        with requests.Session() as s:
            for _ in range(10):
                r = s.patch(f"{base}{path}.json", params={"ns": ns, "print": "silent"}, headers=ADMIN,
                            data=json.dumps({"n": {".sv": {"increment": 1}}}))
                assert r.status_code == 204

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert call("GET", base, path + "/n", ns).json() == 60


DEEP = {}
_node = DEEP
for _ in range(40):
    _node["d"] = {}
    _node = _node["d"]
_node["leaf"] = 1

BAD_INPUT = {
    "malformed JSON": dict(method="PUT", raw=b'{"a": 1,'),
    "empty body": dict(method="PUT", raw=b""),
    "NaN": dict(method="PUT", raw=b'{"a": NaN}'),
    "key with a dot": dict(method="PUT", body={"a.b": 1}),
    "key with a dollar": dict(method="PUT", body={"$x": 1}),
    "key with a slash": dict(method="PUT", body={"a/b": 1}),
    "key with a control char": dict(method="PUT", body={"a\u0001": 1}),
    "unknown dot key": dict(method="PUT", body={".foo": 1}),
    "key too long": dict(method="PUT", body={"k" * 769: 1}),
    "nested too deep": dict(method="PUT", body=DEEP),
    "string over 10 MB": dict(method="PUT", body={"s": "x" * (10 * 1024 * 1024 + 1)}),
    "unknown server value": dict(method="PUT", body={"t": {".sv": "tomorrow"}}),
    "increment of a string": dict(method="PUT", body={"t": {".sv": {"increment": "1"}}}),
    "PATCH of a non-object": dict(method="PATCH", body=[1, 2]),
    "PATCH with overlapping paths": dict(method="PATCH", body={"a": {"b": 1}, "a/b": 2}),
    "PATCH with one invalid key": dict(method="PATCH", body={"good": 1, "bad]": 2}),
    "unknown query parameter": dict(method="PUT", body=1, params={"orderby": '"$key"'}),
    "query without orderBy": dict(method="GET", params={"limitToFirst": "1"}),
    "unquoted orderBy": dict(method="GET", params={"orderBy": "$key"}),
    "both limits": dict(method="GET", params={"orderBy": '"$key"', "limitToFirst": "1", "limitToLast": "1"}),
    "negative limit": dict(method="GET", params={"orderBy": '"$key"', "limitToFirst": "-1"}),
    "non-string $key bound": dict(method="GET", params={"orderBy": '"$key"', "startAt": "1"}),
    "bad print": dict(method="GET", params={"print": "loud"}),
    "bad print on a write": dict(method="PUT", body={"x": 1}, params={"print": "loud"}),
    "bad format on a write": dict(method="PATCH", body={"x": 1}, params={"format": "yaml"}),
    "huge body": dict(method="PUT", raw=b'"' + b"x" * (33 * 1024 * 1024) + b'"'),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_a_clear_400_and_stores_nothing(base, ns, path, case):
    spec = BAD_INPUT[case]
    call("PUT", base, path + "/keep", ns, "kept")
    response = call(spec["method"], base, path, ns, spec.get("body"), spec.get("params"), raw=spec.get("raw"))
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert isinstance(error, str) and len(error) > 10
    # Nothing was stored, nothing was lost, and the server keeps serving.
    assert call("GET", base, path, ns).json() == {"keep": "kept"}


def test_invalid_paths(base, ns):
    for bad in ("/a$b", "/a[0]", "/a%23b", "/.secret"):
        response = requests.get(f"{base}{bad}.json", params={"ns": ns}, headers=ADMIN)
        assert response.status_code == 400 and "Invalid path" in response.json()["error"], bad
    assert requests.get(f"{base}/no-suffix", params={"ns": ns}, headers=ADMIN).status_code == 404


def test_multi_path_update_is_all_or_nothing_under_rules(localbase, base, ns):
    settings = localbase.settings(database_url=f"https://{ns}.firebaseio.com")
    uid = "atomic-" + uuid.uuid4().hex[:8]
    token = mint_id_token(settings.project_id, uid)
    # One of the two paths is someone else's: the whole update is refused, nothing is written.
    response = requests.patch(f"{base}/.json", params={"ns": ns, "auth": token}, data=json.dumps({
        f"users/{uid}/displayName": "Me", "users/somebody-else/displayName": "Not me"}))
    assert response.status_code == 401 and response.json() == {"error": "Permission denied"}
    assert call("GET", base, f"/users/{uid}", ns).json() is None
    ok = requests.patch(f"{base}/.json", params={"ns": ns, "auth": token}, data=json.dumps({
        f"users/{uid}/displayName": "Me"}))
    assert ok.status_code == 200
    assert call("GET", base, f"/users/{uid}", ns).json() == {"displayName": "Me"}


def test_admin_may_replace_rules_only_as_admin(base, ns):
    current = requests.get(f"{base}/.settings/rules.json", headers=ADMIN)
    assert current.status_code == 200 and '"rules"' in current.text
    assert requests.get(f"{base}/.settings/rules.json").status_code == 401
    broken = requests.put(f"{base}/.settings/rules.json", headers=ADMIN, data='{"rules": {".read": "auth ==="}}')
    assert broken.status_code == 400 and "error" in broken.json()
    # The broken file was not installed: the current rules still answer.
    assert requests.get(f"{base}/.settings/rules.json", headers=ADMIN).text == current.text
