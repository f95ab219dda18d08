"""The request side: each request's collection of tasks, the ASGI middleware and its
lifespan, the inline path, and serving on Hypercorn."""
