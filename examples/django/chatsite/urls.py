from django.urls import path

from chatsite import views

urlpatterns = [
    path("chat", views.chat),
    path("chat/stream", views.chat_stream),
    path("health", views.health),
    path("", views.page),
]
