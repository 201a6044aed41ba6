"""The service and `explain` read URLs through the pipeline's fetcher: what it cannot read
is the same error there, an answer or a line, never a traceback.

The only network is tests/faulty_host.py's host on 127.0.0.1, reached by the service with
its guard opened for it (--allow_private_urls), and no packet leaves loopback.
"""

from __future__ import annotations

import pytest

from pipeline.explain import ExplainError, run
from tests import serve_support
from tests.conftest import COLOURS, painting
from tests.serve_support import make_app, ready_client

loopback_only = serve_support.loopback_only

REDIRECTS = ["file:///etc/passwd", "gopher://127.0.0.1:70/1"]


@pytest.mark.parametrize("target", REDIRECTS)
def test_the_service_answers_502_fetch_failed_for_a_redirect_to_another_scheme(
    tiny_bundle, faulty_host, target
):
    app = make_app(tiny_bundle, allow_private_urls=True, fetch_timeout_s=5.0)
    with ready_client(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/predict", json={"url": f"{faulty_host.url}/redirect.jpg?to={target}"}
        )
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["kind"] == "fetch_failed" and "redirected to" in error["message"]
    assert "Traceback" not in response.text


def test_explain_names_a_redirect_to_a_local_file_and_explains_the_rest(
    tiny_bundle, faulty_host, tmp_path, capsys
):
    good = str(painting(tmp_path / "red.jpg", COLOURS["Red_Period"], seed=0))
    redirected = f"{faulty_host.url}/redirect.jpg?to={REDIRECTS[0]}"
    with pytest.raises(ExplainError, match="1 of 2 images could not be explained"):
        run([redirected, good, f"--output={tmp_path / 'out'}", f"--model={tiny_bundle}"])
    assert f"{redirected}: fetch_failed: could not read" in capsys.readouterr().err
    assert (tmp_path / "out" / "red.png").is_file()
