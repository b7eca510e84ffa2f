"""Family routes: each module here exposes `router`, a FastAPI APIRouter that
`api_stub.app.create_app` includes (a family adds its routes without editing app.py).
Routers take their auth from `api_stub.auth.require(scope)`."""
