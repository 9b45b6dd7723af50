'use strict';
// Django's navigation sidebar takes about 300 pixels. On a window narrower than a list with its filters
// needs, it starts closed, unless the person opened it there before (Django's toggle remembers the
// choice in localStorage; this script keeps what it remembers equal to what the page shows).
{
    const key = 'django.admin.navSidebarIsOpen';
    const main = document.getElementById('main');
    const sidebar = document.getElementById('nav-sidebar');
    const toggle = document.getElementById('toggle-nav-sidebar');
    if (main && sidebar && toggle) {
        if (localStorage.getItem(key) === null && window.matchMedia('(max-width: 1199px)').matches) {
            main.classList.remove('shifted');
            sidebar.setAttribute('aria-expanded', 'false');
        }
        // runs after Django's own listener (registered first, by nav_sidebar.js)
        toggle.addEventListener('click', function() {
            const open = main.classList.contains('shifted') ? 'true' : 'false';
            localStorage.setItem(key, open);
            sidebar.setAttribute('aria-expanded', open);
        });
    }
}
