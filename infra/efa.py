"""The network-interface layout that gives an EFA instance its full fabric bandwidth.

AWS's recommendation for instance types with several network cards ("Maximize network bandwidth on
Amazon EC2 instances with multiple network cards", EC2 user guide): the primary interface (card 0,
device 0) is a plain ENA interface for IP traffic; card 0 gets an EFA-only interface at device 1; every
further card gets one EFA-only interface at device 0. A p4d/p4de thus has 4 EFA devices, a p5 32, a
p5en 16 (the catalog's efa_interfaces), plus the one ENA interface that carries the node's address.
EFA-only interfaces carry no IP address, so NCCL's RDMA traffic never mixes with the API's.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.planning import catalog


@dataclass(frozen=True)
class InterfaceSlot:
    network_card_index: int
    device_index: int
    interface_type: str     # "interface" (ENA) | "efa-only"


def interface_layout(instance_type: str) -> list[InterfaceSlot]:
    cards = catalog.instance(instance_type, "aws.instance_type").efa_interfaces
    slots = [InterfaceSlot(0, 0, "interface")]
    if cards:
        slots.append(InterfaceSlot(0, 1, "efa-only"))
        slots += [InterfaceSlot(card, 0, "efa-only") for card in range(1, cards)]
    return slots


def efa_device_count(slots: list[InterfaceSlot]) -> int:
    return sum(slot.interface_type in ("efa", "efa-only") for slot in slots)
