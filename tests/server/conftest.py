import pytest

from server_helpers import API_KEY, MODEL, ServerThread


@pytest.fixture(scope="module")
def server(tiny_engine):
    from moe_offload.server.app import create_app

    with ServerThread(create_app(tiny_engine, MODEL, api_key=API_KEY, max_queue=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
