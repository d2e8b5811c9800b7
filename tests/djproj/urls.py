from django.urls import path

from djproj import views

urlpatterns = [
    path("items/<int:item_id>", views.item),
    path("sync-items/<int:item_id>", views.sync_item),
    path("boom", views.boom),
    path("stream", views.stream),
    path("astream", views.astream),
    path("slow-stream", views.slow_stream),
    path("aslow-stream", views.aslow_stream),
    path("broken-stream", views.broken_stream),
    path("abroken-stream", views.abroken_stream),
]
