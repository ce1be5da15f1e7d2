// One tab of tests/system/test_tabs.py: a client per `sessionId` group of the URL, on the broker at
// `baseUrl`, recording what it receives for the test to read (window.tab).
//   ?baseUrl=…&sessionId=a&sessionId=b          one client of sessions a and b
//   &clients=split                               one client per session instead
//   &token=mint                                  getToken: window.mintToken() (async, exposed by the test)
//   &shared=false                                a stream of its own
import { createSSEClient } from "/static/sse-client.js";

const params = new URLSearchParams(location.search);
const sessions = params.getAll("sessionId");
const groups = params.get("clients") === "split" ? sessions.map((s) => [s]) : [sessions];
const tab = {
  received: [], // ids, in the order onMessage reported them, across every client
  statuses: [],
  tokens: 0,
  errors: [],
  clients: [],
};
window.tab = tab;

for (const group of groups) {
  const client = createSSEClient({
    baseUrl: params.get("baseUrl"),
    sessionId: group.length === 1 ? group[0] : group,
    shared: params.get("shared") !== "false",
    getToken:
      params.get("token") === "mint"
        ? async () => {
            tab.tokens += 1;
            return window.mintToken();
          }
        : null,
    onMessage: (message) => tab.received.push(message.id),
    onError: (error) => tab.errors.push(error.message),
  });
  client.subscribe((state) => {
    if (tab.statuses.at(-1) !== state.status) tab.statuses.push(state.status);
    document.getElementById("status").textContent = tab.clients.every((c) => c.connected)
      ? "connected"
      : state.status;
  });
  tab.clients.push(client);
}
for (const client of tab.clients) client.connect();
