from celery import shared_task
from django.db.models import F

from shop.models import Heartbeat, Order


@shared_task
def send_receipt(order_id: int) -> str:
    # Runs only after the view's transaction committed: the order is there.
    order = Order.objects.get(pk=order_id)
    Order.objects.filter(pk=order_id).update(receipts=F("receipts") + 1)
    return f"receipt for order {order.pk} ({order.item})"


@shared_task
def heartbeat() -> int:
    return Heartbeat.objects.create().pk
