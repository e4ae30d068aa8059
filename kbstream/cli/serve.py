"""`kbstream serve`: the HTTP retrieval API (kbstream/api.py) under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from kbstream.cli.common import HomeOpt, app, cli_settings, err, fail


@app.command()
def serve(
    home: HomeOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on", min=1, max=65535)] = 8000,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="serve without KBSTREAM_API_KEY (local use only)")
    ] = False,
) -> None:
    """Serve search over HTTP (OpenAPI at /docs, behind the key; Dify external knowledge API at
    POST /retrieval, bearer token KBSTREAM_API_KEY). Runs until interrupted."""
    import uvicorn

    from kbstream.api import create_app
    from kbstream.bootstrap import Container

    settings = cli_settings(home, quiet=False)
    if settings.api_key is None and not no_auth:
        fail("set KBSTREAM_API_KEY (the bearer token clients send), or pass --no-auth")
    container = Container(settings)
    try:
        api = create_app(container, settings.api_key)
        err.print(f"serving {settings.home} on http://{host}:{port} (OpenAPI: /docs)")
        uvicorn.run(api, host=host, port=port, log_level=settings.log_level.lower())
    finally:
        container.close()
