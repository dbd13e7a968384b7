# Publish jobs to Conveyor over NATS from Python (pip install nats-py), and read their results.
import asyncio, json, os, uuid

import nats

async def main():
    nc = await nats.connect(os.environ.get("CONVEYOR_NATS", "nats://127.0.0.1:4222"))
    ns = os.environ.get("CONVEYOR_NAMESPACE", "conveyor")

    # 1. A confirmed publish (JetStream PubAck) that asks for its result on a private inbox.
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    job_id = str(uuid.uuid4())
    await nc.jetstream().publish(
        f"{ns}.jobs.echo",
        json.dumps({"hello": "from python"}).encode(),
        headers={"Conveyor-Id": job_id, "Conveyor-Reply-To": inbox, "Conveyor-Max-Attempts": "3"},
    )
    reply = await replies.next_msg(timeout=30)
    print(json.dumps({
        "id": reply.headers["Conveyor-Id"],
        "status": reply.headers["Conveyor-Status"],
        "output": json.loads(reply.data),
    }))

    # 2. The smallest job there is: a plain core PUB with a body and nothing else.
    #    Its result shows up on the results subject like every other one.
    results = await nc.subscribe(f"{ns}.results.echo")
    marker = str(uuid.uuid4())
    await nc.publish(f"{ns}.jobs.echo", json.dumps({"marker": marker}).encode())
    while True:
        msg = await results.next_msg(timeout=30)
        if json.loads(msg.data or b"null") == {"marker": marker}:
            print(json.dumps({"status": msg.headers["Conveyor-Status"], "output": json.loads(msg.data)}))
            break
    await nc.close()

asyncio.run(main())
