// Chat: sends a message and shows the answer as it streams (server-sent events over a
// fetch POST, so the CSRF header can be sent). While streaming, the answer grows as plain
// text; when it ends, the server's rendered and sanitised HTML replaces it. The stop button
// aborts the request, which makes the server drop the upstream call.
(function () {
  'use strict';
  var root = document.querySelector('.chat');
  var form = document.getElementById('composer');
  if (!root || !form) return;
  var conversation = root.getAttribute('data-conversation');
  var csrf = root.getAttribute('data-csrf');
  var prompt = document.getElementById('prompt');
  var model = document.getElementById('model');
  var sendBtn = document.getElementById('send');
  var stopBtn = document.getElementById('stop');
  var regenBtn = document.getElementById('regenerate');
  var errorBox = document.getElementById('composer-error');
  var messages = document.getElementById('messages');
  var controller = null;
  var editing = document.getElementById('editing');
  var attach = document.getElementById('attach');

  // The chosen file as {name, data_base64}, or null.
  function readAttachment() {
    var f = attach && attach.files && attach.files[0];
    if (!f) return Promise.resolve(null);
    return new Promise(function (resolve, reject) {
      var r = new FileReader();
      r.onload = function () {
        var s = String(r.result);
        resolve({ name: f.name, data_base64: s.slice(s.indexOf(',') + 1) });
      };
      r.onerror = function () { reject(r.error); };
      r.readAsDataURL(f);
    });
  }
  var editLast = false;

  function setEditing(on) {
    editLast = on;
    editing.hidden = !on;
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  function bubble(role, text) {
    var art = document.createElement('article');
    art.className = 'msg msg-' + role + (role === 'assistant' ? ' msg-streaming' : '');
    var body = document.createElement('div');
    body.className = 'msg-body msg-text';
    body.textContent = text;
    art.appendChild(body);
    if (role === 'user') {
      var edit = document.createElement('button');
      edit.type = 'button';
      edit.className = 'btn btn-small btn-quiet edit';
      edit.setAttribute('data-text', text);
      edit.textContent = '編集して再送信';
      art.appendChild(edit);
    }
    var empty = messages.querySelector('.empty-chat');
    if (empty) empty.remove();
    messages.appendChild(art);
    art.scrollIntoView({ block: 'end' });
    return art;
  }

  function setBusy(busy) {
    sendBtn.hidden = busy;
    if (busy) regenBtn.hidden = true;
    stopBtn.hidden = !busy;
    prompt.readOnly = busy;
    if (busy) stopBtn.focus(); else prompt.focus();
  }

  async function replaceWithRendered(art, messageId) {
    try {
      var r = await fetch('/chat/' + conversation + '/messages/' + messageId, { headers: { 'Accept': 'text/html' } });
      if (!r.ok) return;
      var html = await r.text();
      var tpl = document.createElement('template');
      tpl.innerHTML = html.trim();
      var fresh = tpl.content.firstElementChild;
      if (fresh) art.replaceWith(fresh);
    } catch (e) { /* the plain text stays */ }
  }

  function handle(name, data, state) {
    var p = {};
    try { p = JSON.parse(data); } catch (e) { return; }
    if (name === 'delta') {
      if (state.status) { state.status.remove(); state.status = null; }
      state.body.textContent += p.text;
    } else if (name === 'status') {
      // A local model's queue position or loading, until the first text.
      if (!p.text) {
        if (state.status) { state.status.remove(); state.status = null; }
      } else {
        if (!state.status) {
          state.status = document.createElement('p');
          state.status.className = 'msg-status hint';
          state.status.setAttribute('role', 'status');
          state.body.parentNode.insertBefore(state.status, state.body);
        }
        state.status.textContent = p.text;
      }
    } else if (name === 'error') {
      if (state.status) { state.status.remove(); state.status = null; }
      state.error = p.message + (p.retryable ? '（もう一度送信できます）' : '');
    } else if (name === 'done') {
      state.messageId = p.message_id;
    }
  }

  // Posts `payload` to `url` and streams the answer into a new bubble. `asked` is the
  // question shown above it (none when regenerating).
  async function run(url, payload, asked) {
    showError('');
    if (asked !== null) bubble('user', asked);
    var art = bubble('assistant', '');
    var state = { body: art.querySelector('.msg-body'), error: '', messageId: null, status: null };
    controller = new AbortController();
    setBusy(true);
    try {
      var r = await fetch(url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'Accept': 'text/event-stream', 'X-CSRF-Token': csrf },
        body: JSON.stringify(payload),
        signal: controller.signal
      });
      if (!r.ok) {
        var err = {};
        try { err = await r.json(); } catch (e) { /* not JSON */ }
        art.remove();
        var prev = messages.lastElementChild;
        if (asked !== null && prev && prev.classList.contains('msg-user')) prev.remove();
        showError((err.error && err.error.message) || '送信できませんでした。');
        return;
      }
      if (asked !== null) prompt.value = '';
      var reader = r.body.getReader();
      var decoder = new TextDecoder();
      var buf = '';
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buf += decoder.decode(chunk.value, { stream: true });
        var at;
        while ((at = buf.indexOf('\n\n')) >= 0) {
          var frame = buf.slice(0, at);
          buf = buf.slice(at + 2);
          var name = 'message', data = '';
          frame.split('\n').forEach(function (line) {
            if (line.indexOf('event:') === 0) name = line.slice(6).trim();
            else if (line.indexOf('data:') === 0) data += line.slice(5).trim();
          });
          handle(name, data, state);
        }
      }
      if (state.error) showError(state.error);
      if (state.messageId) await replaceWithRendered(art, state.messageId);
      // The server names a new conversation after its first question.
      var title = document.getElementById('conv-title');
      if (asked && title && title.textContent === '新しい会話') {
        var line = asked.trim().split('\n')[0];
        title.textContent = line.length > 40 ? line.slice(0, 40) + '…' : line;
      }
    } catch (e) {
      if (e.name === 'AbortError') {
        art.classList.remove('msg-streaming');
        var note = document.createElement('p');
        note.className = 'msg-status';
        note.textContent = '■ 途中で停止しました';
        art.appendChild(note);
      } else {
        showError('通信が切れました。もう一度送信してください。');
      }
    } finally {
      controller = null;
      setBusy(false);
      regenBtn.hidden = false;
      refreshMeter();
    }
  }

  // The remaining allowance beside the input box, as the server counts it now.
  async function refreshMeter() {
    var box = document.getElementById('usage-meter');
    if (!box) return;
    try {
      var r = await fetch('/usage/meter', { headers: { 'Accept': 'text/html' } });
      if (r.ok) box.innerHTML = await r.text();
    } catch (e) { /* keep the last figures */ }
  }

  async function send() {
    var text = prompt.value;
    if (!text.trim()) { showError('メッセージを入力してください。'); prompt.focus(); return; }
    var attachment = null;
    try { attachment = await readAttachment(); } catch (e) { showError('添付ファイルを読み込めませんでした。'); return; }
    var payload = { content: text, model_id: model.value, edit_last: editLast, attachment: attachment };
    var useKnowledge = document.getElementById('use-knowledge');
    if (useKnowledge && useKnowledge.checked) {
      payload.knowledge = Array.prototype.map.call(
        document.querySelectorAll('.knowledge-picker input[name="collection"]:checked'),
        function (c) { return c.value; });
    }
    setEditing(false);
    await run('/api/v1/conversations/' + conversation + '/messages', payload, text);
    if (attach && !errorBox.textContent) attach.value = '';
  }

  function regenerate() {
    run('/api/v1/conversations/' + conversation + '/regenerate', { model_id: model.value }, null);
  }

  form.addEventListener('submit', function (e) { e.preventDefault(); if (!controller) send(); });
  // A prompt composed from a template for this new conversation is sent at once.
  var pendingKey = 'yakuba.send.' + conversation;
  var pending = sessionStorage.getItem(pendingKey);
  if (pending) {
    sessionStorage.removeItem(pendingKey);
    try {
      var p = JSON.parse(pending);
      prompt.value = p.content || '';
      if (p.model_id && model.querySelector('option[value="' + p.model_id.replace(/[^0-9a-f]/g, '') + '"]')) model.value = p.model_id;
      // A RAG template: ask over its knowledge (none ticked means all the user may read).
      var useKnowledge = document.getElementById('use-knowledge');
      if (Array.isArray(p.knowledge) && useKnowledge) {
        useKnowledge.checked = true;
        p.knowledge.forEach(function (id) {
          var box = document.querySelector('.knowledge-picker input[name="collection"][value="' + String(id).replace(/[^0-9a-f]/g, '') + '"]');
          if (box) box.checked = true;
        });
      }
      if (prompt.value.trim()) send();
    } catch (e) { /* ignore a damaged entry */ }
  }
  prompt.addEventListener('keydown', function (e) {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); if (!controller) send(); }
  });
  stopBtn.addEventListener('click', function () { if (controller) controller.abort(); });
  regenBtn.addEventListener('click', function () { if (!controller) regenerate(); });
  document.getElementById('cancel-edit').addEventListener('click', function () { setEditing(false); prompt.value = ''; prompt.focus(); });
  // Only the last question can be edited and sent again.
  function markEditable() {
    var users = messages.querySelectorAll('.msg-user');
    users.forEach(function (u, i) {
      var b = u.querySelector('button.edit');
      if (b) b.hidden = i !== users.length - 1;
    });
  }
  markEditable();
  new MutationObserver(markEditable).observe(messages, { childList: true });
  document.addEventListener('click', function (e) {
    var b = e.target.closest && e.target.closest('button.edit');
    if (!b || controller) return;
    prompt.value = b.getAttribute('data-text') || '';
    setEditing(true);
    prompt.focus();
  });
  document.addEventListener('click', function (e) {
    var b = e.target.closest && e.target.closest('button.copy');
    if (!b || !navigator.clipboard) return;
    navigator.clipboard.writeText(b.getAttribute('data-copy') || '').then(function () {
      var old = b.textContent; b.textContent = 'コピーしました'; setTimeout(function () { b.textContent = old; }, 1500);
    });
  });
}());
