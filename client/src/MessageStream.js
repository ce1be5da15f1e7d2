// MessageStream: a React component showing one session's messages live, built on useSSE.
//
// Like useSSE.js it takes React as an argument (see there why), and uses createElement, so
// no JSX compiler is needed either; `import { MessageStream } from "pgsse-client/react"` has
// it bound already:
//
//   import { createMessageStream } from "/static/MessageStream.js";
//   const MessageStream = createMessageStream(React);
//   root.render(React.createElement(MessageStream, { sessionId: "123" }));
//
// Props: every useSSE option, plus `onNewMessage(message)` (called once per new message, as
// onMessage is; an edit or a recall is shown in place, and reported to onMessageUpdated and
// onMessageDeleted), `title`, `className`, `showControls` (default true) and
// `renderMessage(message)` to replace the default rendering of one message's body.
// Markup: section.pgsse-stream > header (status, buttons), p[role=alert] for errors, and
// ol[aria-live=polite] > li.pgsse-message.bot|.human[data-id].

import { STATUS_TEXT } from "./sse-client.js";
import { createUseSSE } from "./useSSE.js";

function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString();
}

export function createMessageStream(React) {
  const h = React.createElement;
  const useSSE = createUseSSE(React);

  return function MessageStream(props) {
    const { title = "Messages", className = "", showControls = true, renderMessage } = props;
    const sse = useSSE({
      ...props,
      onMessage: (message) => {
        props.onMessage?.(message);
        props.onNewMessage?.(message);
      },
    });
    const { connected, messages, error, connect, disconnect, clearMessages } = sse;

    const controls = showControls
      ? h(
          "div",
          { className: "pgsse-controls" },
          connected
            ? h("button", { type: "button", onClick: disconnect }, "Disconnect")
            : h("button", { type: "button", onClick: connect }, "Connect"),
          h("button", { type: "button", onClick: clearMessages }, "Clear"),
        )
      : null;

    return h(
      "section",
      { className: `pgsse-stream ${className}`.trim(), "aria-label": title },
      h(
        "header",
        null,
        h("h2", null, title),
        h(
          "span",
          { className: "pgsse-status", role: "status", "data-status": sse.status },
          STATUS_TEXT[sse.status],
          sse.reconnectAttempts > 0 ? ` (attempt ${sse.reconnectAttempts})` : null,
        ),
        controls,
      ),
      error ? h("p", { className: "pgsse-error", role: "alert" }, error.message) : null,
      h(
        "ol",
        { className: "pgsse-messages", "aria-live": "polite", "aria-relevant": "additions" },
        messages.map((message) =>
          h(
            "li",
            {
              key: message.id,
              "data-id": message.id,
              className: `pgsse-message ${message.isFromBot ? "bot" : "human"}`,
            },
            h(
              "div",
              { className: "pgsse-meta" },
              h("span", null, message.isFromBot ? "Bot" : "Human"),
              message.robotId ? h("span", null, ` · ${message.robotId}`) : null,
              message.intent ? h("span", null, ` · ${message.intent}`) : null,
              " ",
              h("time", { dateTime: message.createdAt }, formatTime(message.createdAt)),
            ),
            renderMessage
              ? renderMessage(message)
              : h("p", { className: "pgsse-content" }, message.content),
          ),
        ),
      ),
    );
  };
}
