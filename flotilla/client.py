"""The device SDK: run a Flotilla device against a server (``flotilla join`` uses the same classes).

from flotilla.client import Device
report = Device("server:50051", token, model=MyNet(), data=(x, y), ca="certs/ca.pem").run()
"""

from flotilla.network.client import (
    Assignment,
    Backoff,
    CheckIn,
    Connection,
    Device,
    DeviceReport,
    GaveUp,
    Refused,
    TLSError,
    as_device_data,
    check_device_data,
    export_clients,
    load_device_data,
    save_device_data,
)

__all__ = [
    "Assignment",
    "Backoff",
    "CheckIn",
    "Connection",
    "Device",
    "DeviceReport",
    "GaveUp",
    "Refused",
    "TLSError",
    "as_device_data",
    "check_device_data",
    "export_clients",
    "load_device_data",
    "save_device_data",
]
