"""The HTTP layer: the endpoint table, the handlers, the middlewares, SSE, the server's lifecycle and OpenAPI.

Everything that knows of aiohttp's web app lives here; below it, the serving layer takes parsed requests.
"""
