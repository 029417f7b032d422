from celery import shared_task

from shop.models import Heartbeat, Order


@shared_task
def send_receipt(order_id: int) -> str:
    # Runs only after the view's transaction committed: the order is there.
    order = Order.objects.get(pk=order_id)
    order.receipt_sent = True
    order.save(update_fields=["receipt_sent"])
    return f"receipt for order {order.pk} ({order.item})"


@shared_task
def heartbeat() -> int:
    return Heartbeat.objects.create().pk
