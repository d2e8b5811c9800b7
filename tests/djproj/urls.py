from django.urls import path

from djproj import views

urlpatterns = [
    path("items/<int:item_id>", views.item),
    path("sync-items/<int:item_id>", views.sync_item),
    path("boom", views.boom),
    path("stream", views.stream),
    path("astream", views.astream),
]
