// Exercises the remaining capabilities from JavaScript, for the tests: a message
// {"to", "text", "url"} sends an SMS, POSTs the text to `url` (an allow-listed origin), and
// publishes what the endpoint answered to the config's `out` topic. A denied call dead-letters.

import * as wasmq from './wasmq.js';

export const consumer = wasmq.consumer((message) => {
  const order = message.json();
  const { out } = wasmq.context.config();
  const me = wasmq.context.identity();
  return wasmq.outcomeOf(() => {
    wasmq.sms.send(order.to, order.text);
    const answer = wasmq.http.request('POST', order.url, {
      headers: [['content-type', 'text/plain']],
      body: order.text,
    });
    wasmq.publish.sendJson(
      out,
      { status: answer.status, body: new TextDecoder().decode(answer.body), group: me.group, lang: 'js' },
      { key: message.id },
    );
  });
});
