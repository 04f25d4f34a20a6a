async def test_health(api):
    status, body = await api.call("GET", "/health", key=None)
    assert status == 200
