//! The demo page at `/`: a small form that places an order with `fetch`, starts the trace in the
//! browser (it sends its own `traceparent`), and shows the trace id with a link to Jaeger.
//!
//! The browser only mints the ids; it exports no span of its own, so in Jaeger the gateway's
//! SERVER span appears with a parent that is not in the trace (Jaeger notes the missing parent).

use axum::extract::State;
use axum::response::Html;

use crate::AppState;

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tracehop checkout</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 38rem; margin: 3rem auto; padding: 0 1rem; color: #222; }
  label { display: block; margin: .6rem 0 .2rem; }
  input, select, button { font: inherit; padding: .3rem .5rem; }
  button { margin-top: 1rem; }
  #result { margin-top: 1.5rem; padding: 1rem; background: #f4f4f4; border-radius: 4px; white-space: pre-wrap; }
  code { font-size: .9em; }
</style>
</head>
<body>
<h1>tracehop checkout</h1>
<p>Places an order through <code>POST /api/checkout</code>. This page starts the trace: it sends a
<code>traceparent</code> of its own, and the gateway, checkout and stock continue it.</p>
<form id="order">
  <label for="customer">Customer</label>
  <input id="customer" name="customer" value="c-42" required>
  <label for="sku">Product</label>
  <select id="sku" name="sku">
    <option value="SKU-001">SKU-001 ($24.50)</option>
    <option value="SKU-002">SKU-002 ($59.00)</option>
    <option value="SKU-003">SKU-003 ($12.00)</option>
  </select>
  <label for="quantity">Quantity</label>
  <input id="quantity" name="quantity" type="number" min="1" value="2" required>
  <br><button id="place" type="submit">Place order</button>
</form>
<div id="result" hidden></div>
<script>
const JAEGER_UI_URL = "__JAEGER_UI_URL__";
function hex(bytes) {
  const buffer = new Uint8Array(bytes);
  crypto.getRandomValues(buffer);
  return Array.from(buffer, b => b.toString(16).padStart(2, "0")).join("");
}
document.getElementById("order").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = document.getElementById("result");
  const traceparent = `00-${hex(16)}-${hex(8)}-01`;
  result.hidden = false;
  result.textContent = "Placing the order…";
  try {
    const response = await fetch("api/checkout", {
      method: "POST",
      headers: { "content-type": "application/json", "traceparent": traceparent },
      body: JSON.stringify({
        customer_id: document.getElementById("customer").value,
        items: [{ sku: document.getElementById("sku").value, quantity: Number(document.getElementById("quantity").value) }],
      }),
    });
    const body = await response.json();
    result.replaceChildren();
    const line = (label, value, id) => {
      const row = document.createElement("div");
      row.append(label + ": ");
      const span = document.createElement("code");
      span.textContent = value;
      if (id) span.id = id;
      row.append(span);
      result.append(row);
    };
    line("Status", String(response.status), "status");
    line("Sent traceparent", traceparent, "sent-traceparent");
    if (response.ok) {
      line("Order", body.order_id, "order-id");
      line("Total", "$" + (body.total_cents / 100).toFixed(2), "total");
      line("Trace id", body.trace_id, "trace-id");
      const link = document.createElement("a");
      link.id = "jaeger-link";
      link.href = `${JAEGER_UI_URL}/trace/${body.trace_id}`;
      link.target = "_blank";
      link.textContent = "Open in Jaeger";
      result.append(link);
    } else {
      line("Error", body.error, "error");
    }
  } catch (error) {
    result.textContent = "The request failed: " + error;
  }
});
</script>
</body>
</html>
"#;

/// Handles `GET /` (not traced: a static page).
pub async fn index(State(state): State<AppState>) -> Html<String> {
    Html(PAGE.replace("__JAEGER_UI_URL__", &escape_js(&state.jaeger_ui_url)))
}

/// Makes `value` safe inside a double-quoted JavaScript string in an HTML page.
fn escape_js(value: &str) -> String {
    value
        .chars()
        .flat_map(|c| match c {
            '"' | '\\' | '<' | '>' | '&' | '\'' => format!("\\u{:04x}", c as u32).chars().collect::<Vec<_>>(),
            c if c.is_control() => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::escape_js;

    #[test]
    fn the_jaeger_url_cannot_break_out_of_the_script() {
        assert_eq!(escape_js("http://localhost:16686"), "http://localhost:16686");
        assert_eq!(escape_js("\"</script><script>x()"), "\\u0022\\u003c/script\\u003e\\u003cscript\\u003ex()");
    }
}
