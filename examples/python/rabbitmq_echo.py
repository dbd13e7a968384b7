# Publish a job to Conveyor over RabbitMQ from Python (pip install pika) and wait for its result.
import json, os, uuid

import pika

params = pika.URLParameters(os.environ.get("CONVEYOR_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f"))
ns = os.environ.get("CONVEYOR_NAMESPACE", "conveyor")
connection = pika.BlockingConnection(params)
channel = connection.channel()
channel.confirm_delivery()  # basic_publish now waits for the broker's confirm

reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
# Replies arrive through the direct exchange <ns>.replies, keyed by the reply queue's name.
channel.queue_bind(reply_queue, f"{ns}.replies", routing_key=reply_queue)
job_id = str(uuid.uuid4())
channel.basic_publish(
    exchange=f"{ns}.jobs",
    routing_key="echo",
    body=json.dumps({"hello": "from python"}),
    properties=pika.BasicProperties(
        message_id=job_id,
        reply_to=reply_queue,
        correlation_id=job_id,
        content_type="application/json",
        delivery_mode=2,
        headers={"Conveyor-Max-Attempts": "3"},
    ),
    mandatory=True,
)
for method, props, body in channel.consume(reply_queue, auto_ack=True, inactivity_timeout=30):
    if method is None:
        raise SystemExit("no result within 30 s")
    print(json.dumps({
        "id": props.message_id,
        "correlation_id": props.correlation_id,
        "status": props.headers["Conveyor-Status"],
        "output": json.loads(body),
    }))
    break
connection.close()
