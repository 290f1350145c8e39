"""Locust users for mabrec, for people who load-test with Locust (`pip install locust`):

    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --users 64 --spawn-rate 16

A user browses like the `mabrec bench http --mix recommend=8,open=1,list=1` session: mostly
slates, sometimes opening a movie from the last slate (a click, attributed to the slate), now and
then a catalog page. Users are drawn from a Zipf distribution over 100,000 ids.
"""

from __future__ import annotations

import random

import numpy as np
from locust import FastHttpUser, between, task

USERS = 100_000


class Browser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.uxid = f"locust-{(int(np.random.default_rng().zipf(1.1)) - 1) % USERS}"
        self.slate: list[int] = []
        self.rid = ""

    @task(8)
    def recommendations(self) -> None:
        with self.client.get(
            "/api/recommendations/movies?limit=10",
            headers={"uxid": self.uxid},
            name="/api/recommendations/movies",
            catch_response=True,
        ) as response:
            if response.status_code == 200 and len(response.json()) == 10:
                self.slate = [m["id"] for m in response.json()]
                self.rid = response.headers.get("x-recommendation-id", "")
                response.success()
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(1)
    def open_movie(self) -> None:
        if not self.slate:
            return
        movie = random.choice(self.slate)
        self.client.get(
            f"/api/movies/{movie}",
            headers={"uxid": self.uxid, "X-Recommendation-Id": self.rid},
            name="/api/movies/{id}",
        )

    @task(1)
    def catalog_page(self) -> None:
        self.client.get(f"/api/movies?page={random.randint(1, 50)}&per_page=20", name="/api/movies")
