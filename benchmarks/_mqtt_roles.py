"""
The MQTT scenario's processes: a paho-mqtt subscriber and publisher through
a Mosquitto broker, persistent sessions (MQTT 5 ``clean_start=False`` with a
session expiry interval; MQTT 3.1.1 ``clean_session=False`` for the QoS 1
publisher), QoS 1 or 2.

What MQTT promises, and what is checked: QoS 1 is at-least-once and QoS 2
exactly-once between each client and the broker; messages published by one
client on one topic at one QoS reach a subscriber in publication order
(MQTT 5, 4.6).  The subscriber checks that message ``i`` arrives after
``0 .. i-1``, each once: a gap fails the run at once (the broker dropped
messages: Mosquitto drops QoS 1/2 messages beyond ``max_queued_messages``
for a subscriber that falls behind), a repeat is counted as a duplicate.

Best configuration for throughput: the subscriber speaks MQTT 5 with a
Receive Maximum of 65,535 (the broker may have that many messages in flight
to it; as an MQTT 3.1.1 client it would get Mosquitto's default of 20, and
messages beyond ``max_queued_messages`` would be dropped).  At QoS 1 the
publisher speaks MQTT 3.1.1 (``clean_session=False``), which has no Receive
Maximum, and keeps up to 65,535 messages unacknowledged (Mosquitto
acknowledges QoS 1 at once); as an MQTT 5 client it would be bound to the
broker's Receive Maximum (Mosquitto's ``max_inflight_messages``, 20 by
default).  At QoS 2 that limit holds whatever the protocol version
(Mosquitto drops QoS 2 publishes beyond it: tried, messages were lost), so
the publisher speaks MQTT 5, learns the broker's Receive Maximum from a
first connection (paho does not apply it by itself) and keeps that many in
flight (``max_inflight_messages_set``) with an unbounded client queue
(``max_queued_messages_set(0)``) and drives its network loop itself in one
thread (paho's background thread costs a wake-up per publish).
"""

from __future__ import annotations

import threading
from typing import Any

from benchmarks._harness import (
    cpu_seconds,
    now,
    payload,
    peak_rss_mb,
    read_stamp,
    ready,
    result,
    stamped,
)

SESSION_EXPIRY = 600
OUTSTANDING = 50_000
"""At most this many publishes not yet acknowledged (packet ids are 16 bits)."""


def _client(
    options: dict[str, Any], client_id: str, clean: bool = False, v5: bool = True
) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if v5:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
    else:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean,
        )
    client.max_inflight_messages_set(options.get("inflight", 65535))
    client.max_queued_messages_set(0)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0 if clean else SESSION_EXPIRY
    properties.ReceiveMaximum = 65535
    connected = threading.Event()
    refused: list[str] = []
    limits: list[int] = []

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        limits.append(getattr(props, "ReceiveMaximum", 65535))
        connected.set()

    client.on_connect = on_connect
    if v5:
        client.connect(
            options["host"], options["port"], clean_start=clean, properties=properties
        )
    else:
        client.connect(options["host"], options["port"])
    deadline = now() + 10
    while not connected.is_set() and now() < deadline:
        client.loop(0.05)
    if refused or not connected.is_set():
        raise SystemExit(f"MQTT connection refused or timed out: {refused}")
    # MQTT 5: how many unacknowledged publishes the broker takes.
    client.broker_receive_maximum = limits[0] if limits else 65535
    return client


def subscriber(options: dict[str, Any]) -> None:
    qos, messages, mode = options["qos"], options["messages"], options["mode"]
    size = options.get("size", 64)
    state: dict[str, Any] = {
        "count": 0,
        "duplicates": 0,
        "first": 0.0,
        "cpu_first": 0.0,
        "error": None,
    }
    sent_at: list[float] = []
    delivered_at: list[float] = []
    client = _client(options, options["client_id"])
    subscribed = threading.Event()

    def on_subscribe(*args: Any) -> None:
        subscribed.set()

    def finish(error: str | None = None) -> None:
        figures: dict[str, Any] = {
            "first": state["first"],
            "last": now(),
            "receiver_cpu": cpu_seconds() - state["cpu_first"],
            "receiver_rss_mb": peak_rss_mb(),
            "received": state["count"],
            "duplicates": state["duplicates"],
        }
        if error:
            figures["error"] = error
        if mode != "throughput":
            figures["sent_at"] = sent_at
            figures["delivered_at"] = delivered_at
        result(figures)
        client.disconnect()

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        count = state["count"]
        if state["error"] is not None:
            return
        # The clock only where it is used (as every receiver here does).
        at = now() if mode != "throughput" or count == 0 else 0.0
        if count == 0:
            state["first"] = at
            state["cpu_first"] = cpu_seconds()
        if mode == "throughput":
            index = int(message.payload)
            if message.payload != payload(index, size):
                index = -2
        else:
            index, sent = read_stamp(message.payload)
        if index < count and index >= 0:
            state["duplicates"] += 1
            return
        if index != count:
            state["error"] = (
                f"expected message {count}, got {index}: messages lost or "
                f"reordered (QoS {qos})"
            )
            finish(state["error"])
            return
        if mode != "throughput":
            sent_at.append(sent)
            delivered_at.append(at)
        state["count"] = count = count + 1
        if count == messages:
            finish()

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.subscribe(options["topic"], qos)
    while not subscribed.is_set():
        client.loop(0.05)
    ready()
    client.loop_forever()


def publisher(options: dict[str, Any]) -> None:
    qos, messages, mode = options["qos"], options["messages"], options["mode"]
    size, topic = options.get("size", 64), options["topic"]
    inflight = options.get("inflight", 65535)
    v5 = qos == 2
    if v5:
        # MQTT 5: never more unacknowledged publishes than the broker takes
        # (its Receive Maximum, which paho learns but does not apply by
        # itself), so ask first: the window cannot change on an open
        # connection.
        probe = _client(options, options["publisher_id"] + "-probe", clean=True)
        inflight = min(inflight, probe.broker_receive_maximum)
        probe.disconnect()
    options = {**options, "inflight": inflight}
    client = _client(options, options["publisher_id"], v5=v5)
    acked = [0]

    def on_publish(*args: Any) -> None:
        acked[0] += 1

    client.on_publish = on_publish
    cpu = cpu_seconds()
    if mode == "throughput":
        payloads = [payload(i, size) for i in range(messages)]
        start = now()
        for index, contents in enumerate(payloads):
            client.publish(topic, contents, qos)
            if index % 64 == 63:
                client.loop(0)
                # Packet ids are 16 bits: a message queued in paho takes
                # one until acknowledged, and an id reused while still
                # queued loses the older message.
                while index + 1 - acked[0] > OUTSTANDING:
                    client.loop(0.001)
    else:
        start = now()
        interval = 1.0 / options["rate"]
        for index in range(messages):
            while (wait := start + index * interval - now()) > 0:
                client.loop(min(wait, 0.001))
            client.publish(topic, stamped(index, size), qos)
            client.loop(0)
    deadline = now() + 600
    while acked[0] < messages and now() < deadline:
        client.loop(0.01)
    done = now()
    result(
        {
            "start": start,
            "acked": done,
            "sender_cpu": cpu_seconds() - cpu,
            "sender_rss_mb": peak_rss_mb(),
            "publisher_acks": acked[0],
            "publisher_inflight": inflight,
        }
    )
    client.disconnect()


def remove_sessions(host: str, port: int, client_ids: list[str]) -> None:
    """
    End the persistent sessions of ``client_ids`` on the broker: connect
    each with ``clean_start=True`` and a session expiry of 0, and leave.
    """
    for client_id in client_ids:
        try:
            for v5 in (True, False):
                client = _client({"host": host, "port": port}, client_id, True, v5)
                client.disconnect()
                client.loop(0.05)
        except BaseException:
            pass
