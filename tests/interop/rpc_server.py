#!/usr/bin/env python3
"""Fibonacci RPC server in the style of RabbitMQ tutorial 6, with pika 1.x.

Consumes requests from a queue with prefetch 1, replies fib(n) to the request's reply_to with
the same correlation_id, then acks. Used by the end-to-end tests to check that our client talks
to the tutorial's server and our server to the tutorial's client.

The queue can be declared the way the tutorial versions do it (--declare classic: a plain
`queue_declare(queue)`, as older versions; --declare quorum: durable quorum queue, as newer
ones) or not at all (--declare none: someone else declared it).
"""
import argparse
import sys

import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def fib(n):
    # Iterative: the tutorial's recursive version takes exponential time for larger n.
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def declare(channel, queue, how):
    if how == "classic":
        channel.queue_declare(queue=queue)
    elif how == "quorum":
        channel.queue_declare(
            queue=queue, durable=True, arguments={"x-queue-type": "quorum"}
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--queue", default="rpc_queue")
    parser.add_argument(
        "--declare", choices=["classic", "quorum", "none"], default="classic"
    )
    args = parser.parse_args()

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    declare(channel, args.queue, args.declare)

    def on_request(ch, method, props, body):
        n = int(body)
        print(f" [.] fib({n})", flush=True)
        response = fib(n)
        ch.basic_publish(
            exchange="",
            routing_key=props.reply_to,
            properties=pika.BasicProperties(correlation_id=props.correlation_id),
            body=str(response),
        )
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue=args.queue, on_message_callback=on_request)

    print(" [x] Awaiting RPC requests", flush=True)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        channel.stop_consuming()
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
