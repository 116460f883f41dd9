"""The controller's transports: the MQTT link (``mqtt.py``, the only controller module importing aiomqtt)."""
