"""An example tool that is a client of an HTTP JSON service: `search(query)`.

Name it in the tools of a run as `examples.tools.http_tool:search`. It POSTs
`{"query": ...}` as JSON to the URL in the environment variable SLUICE_SEARCH_URL and returns
the service's JSON answer (the model sees it as JSON text). Set the variable where the tool
workers run: the rollout actors' runtime environment (for a job, `ray job submit
--runtime-env-json '{"env_vars": {"SLUICE_SEARCH_URL": "http://search:8000/search"}}'`).

Each request has its own timeout (REQUEST_TIMEOUT_S), below the tool pool's limit on the
call, so that a slow service gives the model the tool's own error line ("TimeoutError: ...")
rather than a killed worker. An HTTP error status or a service that cannot be reached raises:
the model sees the exception's one line, the episode goes on.
"""

import json
import os
import urllib.request

URL_VARIABLE = "SLUICE_SEARCH_URL"
REQUEST_TIMEOUT_S = 5.0


def search(query: str) -> dict:
    """The search service's JSON answer for `query`."""
    url = os.environ.get(URL_VARIABLE)
    if not url:
        raise RuntimeError(f"{URL_VARIABLE} is not set; set it to the search service's URL")
    request = urllib.request.Request(
        url,
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.load(response)
