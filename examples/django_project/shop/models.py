from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=100)
    #: how many times the receipt task ran for this order (once, exactly)
    receipts = models.IntegerField(default=0)


class Heartbeat(models.Model):
    """One row per firing of the periodic task."""

    at = models.DateTimeField(auto_now_add=True)
