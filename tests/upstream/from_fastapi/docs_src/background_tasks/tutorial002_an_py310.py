# From FastAPI, docs_src/background_tasks/tutorial002_an_py310.py
# (https://github.com/fastapi/fastapi, commit c3f316b7e814), MIT licence, Copyright (c) 2018
# Sebastián Ramírez: see LICENSE. Migrated to trio_bg: the import and the install call
# (ordered: the dependency's task first, as in FastAPI).
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI

import trio_bg.fastapi

app = FastAPI()
trio_bg.fastapi.install(app, ordered=True)


def write_log(message: str):
    with open("log.txt", mode="a") as log:
        log.write(message)


def get_query(background_tasks: BackgroundTasks, q: str | None = None):
    if q:
        message = f"found query: {q}\n"
        background_tasks.add_task(write_log, message)
    return q


@app.post("/send-notification/{email}")
async def send_notification(
    email: str, background_tasks: BackgroundTasks, q: Annotated[str, Depends(get_query)]
):
    message = f"message to {email}\n"
    background_tasks.add_task(write_log, message)
    return {"message": "Message sent"}
