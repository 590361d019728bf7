// Templates: sends the composed (and possibly edited) prompt as the first message of a new
// conversation. The conversation is created here; the chat page picks the prompt up from
// sessionStorage (this tab only, gone when the tab closes) and sends it at once.
(function () {
  'use strict';
  var btn = document.getElementById('send-to-chat');
  var text = document.getElementById('composed-prompt');
  var error = document.getElementById('send-error');
  if (!btn || !text) return;
  function show(msg) { error.textContent = msg; error.hidden = !msg; }
  btn.addEventListener('click', async function () {
    show('');
    if (!text.value.trim()) { show('プロンプトが空です。'); text.focus(); return; }
    var model = document.getElementById('model');
    btn.disabled = true;
    try {
      var r = await fetch('/api/v1/conversations', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': text.getAttribute('data-csrf') },
        body: JSON.stringify({ title: text.getAttribute('data-title') })
      });
      var body = await r.json();
      if (!r.ok) { show((body.error && body.error.message) || '会話を作成できませんでした。'); btn.disabled = false; return; }
      sessionStorage.setItem('yakuba.send.' + body.id, JSON.stringify({
        content: text.value,
        model_id: (model && model.value) || text.getAttribute('data-model'),
        knowledge: JSON.parse(text.getAttribute('data-knowledge') || 'null')
      }));
      location.href = '/chat/' + body.id;
    } catch (e) {
      show('通信できませんでした。もう一度お試しください。');
      btn.disabled = false;
    }
  });
})();
