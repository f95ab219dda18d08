# From FastAPI, docs_src/background_tasks/tutorial001_py310.py
# (https://github.com/fastapi/fastapi, commit c3f316b7e814), MIT licence, Copyright (c) 2018
# Sebastián Ramírez: see LICENSE. Migrated to trio_bg: the import and the install call.
from fastapi import BackgroundTasks, FastAPI

import trio_bg.fastapi

app = FastAPI()
trio_bg.fastapi.install(app)


def write_notification(email: str, message=""):
    with open("log.txt", mode="w") as email_file:
        content = f"notification for {email}: {message}"
        email_file.write(content)


@app.post("/send-notification/{email}")
async def send_notification(email: str, background_tasks: BackgroundTasks):
    background_tasks.add_task(write_notification, email, message="some notification")
    return {"message": "Notification sent in the background"}
